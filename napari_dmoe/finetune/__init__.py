"""Fine-tune from corrected cases: export pairs, run `dmoe train` in a subprocess, compare."""
