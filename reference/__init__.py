"""ldmkit.reference: the pure-NumPy, float64 reference of every formula in docs/formulas.md.

Modules: ``schedules`` (S1–S12), ``forward`` (F1–F4), ``posterior`` (P1–P8), ``kl`` (K1–K7),
``losses`` (L1–L11), ``samplers`` (A1–A9), ``analytic`` (X1–X3, P9), ``latent`` (V1, V2),
``quality`` (Q1, Q2: the Fréchet distance), ``exact`` (exact output laws of the linear samplers on Gaussian
data), ``golden`` (the golden files).
Imports NumPy only.
"""
