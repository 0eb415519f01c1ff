"""Golden files: inputs and expected outputs of ldmkit.reference for fixed seeds (data only, no code).

Regenerate with ``ldmkit golden regen`` (``make golden``); verify with ``ldmkit golden check``.
"""
