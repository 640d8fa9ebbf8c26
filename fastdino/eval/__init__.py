"""Evaluation of frozen DINO backbones: the paper's claims, checkable on any run.

    python -m fastdino.eval.knn        --checkpoint CKPT --data_path LABELED_FOLDER   # weighted k-NN
    python -m fastdino.eval.linear     --checkpoint CKPT --data_path LABELED_FOLDER   # linear probe
    python -m fastdino.eval.attention  --checkpoint CKPT --images IMG... [--mask_dir GT]
    python -m fastdino.eval.pca        --checkpoint CKPT --images IMG...   # PCA of patch features (DINOv2 Fig. 1)

CKPT is a fastdino or official DINO training checkpoint (teacher by default, --which student) or a
plain backbone state dict (DINO or DINOv2 layout); `--random_init --arch vit_tiny` evaluates an untrained baseline.
"""
from fastdino.eval.common import EvalError, load_backbone

__all__ = ["EvalError", "load_backbone"]
