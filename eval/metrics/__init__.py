"""Command lines for the evaluation metrics (one per metric) over the library in
``dualforce_mega/metrics``; ``eval.run_eval`` runs them all. See docs/EVAL.md."""
