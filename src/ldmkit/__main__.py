"""``python -m ldmkit``: run the command line (also what ``torchrun -m ldmkit`` runs)."""

from ldmkit.cli import main

if __name__ == "__main__":
    main(prog_name="ldmkit")
