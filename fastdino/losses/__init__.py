"""Objectives as terms: the step sums `weight * term(student, targets)` over the recipe's terms.

A term is an nn.Module with
    name: str                 the key of its value in the metrics ("dino", "koleo", "ibot", "gram")
    weight: float             its weight in the total loss
    schedule_row: int         optional: the weight is hp[schedule_row] * weight (Gram's ramp, fastdino/schedules.py)
    needs: str                optional: a targets key; the step runs the term only when it is there (Gram)
    forward(student, targets) -> scalar fp32 loss, differentiable w.r.t. the student's outputs
where `student` is the dict of student outputs and `targets` the dict of teacher targets, keyed by
what they hold:
    student["cls"]   head outputs of all crops, crop-major (n_crops*B, K); the head's bottleneck
                     (n_crops*B, 256) when its last layer is fused into the DINO term
    student["cls_features"]  the backbone's [CLS] features of the 2 global crops (2B, D), pre-head,
                     present when a term asks for them (KoLeo: MultiCropWrapper(keep_features=True))
    student["patch"] iBOT head outputs of the global crops' masked patch tokens (U, K_ibot), static
                     U = the masks' upper bound (MultiCropWrapper with masks)
    targets["cls"]   teacher probabilities of the 2 global crops (2B, K), fp32 (fastdino/targets.py), or
                     with fused centering kernels.soft_cross_entropy.LogitTargets (the logits and row
                     statistics they are made of; .probs() materializes them)
    student["patch_tokens"]  the backbone's normed patch tokens of the 2 global crops (2B, P, D)
                     (Gram: MultiCropWrapper(keep_patch_tokens=True))
    targets["gram"]  the Gram teacher's patch tokens of the same crops, on the student's grid (2B, P, D)
    targets["patch"], targets["patch_weights"]  the teacher's targets of those tokens (U, K_ibot)
                     fp32 (or LogitTargets, as targets["cls"]) and their weights (U,), 1 / (masked
                     tokens of the crop), 0 on padding
    targets["masks"] the step's MaskBatch (masks, mask_indices, weights, n_masked), with iBOT
                     (Gram with gram.tokens_used masked / unmasked selects its patches by it)
    targets["hp"]    the step's hyper-parameters, one schedule value per row of fastdino/schedules.py
                     (the DINO term's local weight under loss.reweight_local); a term scaled by a row as
                     a whole sets schedule_row instead (Gram)
Its state (if any) is its state_dict, saved in checkpoints. Adding a term touches no backend code:
build it in fastdino/train.py's recipe and the step sums it.
"""
from fastdino.losses.dino import DINOLoss, DINOTerm
from fastdino.losses.gram import GramTerm
from fastdino.losses.ibot import IBOTTerm
from fastdino.losses.koleo import KoLeoTerm

__all__ = ["DINOLoss", "DINOTerm", "GramTerm", "IBOTTerm", "KoLeoTerm"]
