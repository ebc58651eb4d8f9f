"""Stage 5, deployment: export (``export``), torch-free prediction (``predict``), the zero-shot
classifier assembly (``zero_shot``) and latency/FLOP measurement (``latency``).

Nothing here imports the training code; ``predict`` imports neither torch nor timm.
"""
