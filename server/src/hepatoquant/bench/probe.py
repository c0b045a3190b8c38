"""Linear probes on frozen embeddings: one linear layer, as in the HepatoBench protocol.

Features are standardised with the training split's mean and standard deviation (better conditioning for every
optimiser); the standardisation is folded back into the layer afterwards, so the saved head takes raw embeddings
and drops into a classifier pack unchanged. Two ways to fit it:

- ``adamw`` (default): cross-entropy with AdamW on mini-batches, for each learning rate x weight decay of a grid,
  with early stopping on the validation loss (the best epoch's weights are kept);
- ``lbfgs``: scikit-learn's multinomial logistic regression (L-BFGS) for each C of a grid.

The setting with the best validation balanced accuracy wins (ties: lower validation loss). Seeds are fixed, so a
rerun gives the same head.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, log_loss

from hepatoquant.errors import InvalidParameterError

__all__ = ["ProbeConfig", "ProbeResult", "train_probe"]


@dataclass(frozen=True)
class ProbeConfig:
    method: str = "adamw"
    learning_rates: tuple[float, ...] = (1e-2, 1e-3)
    weight_decays: tuple[float, ...] = (1e-4, 1e-2)
    c_values: tuple[float, ...] = (0.01, 0.1, 1.0)
    max_epochs: int = 100
    patience: int = 8
    batch_size: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("adamw", "lbfgs"):
            raise InvalidParameterError(f"probe method {self.method!r} is not known; use adamw or lbfgs")
        if self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise InvalidParameterError("probe max_epochs, patience and batch_size must be at least 1")


@dataclass(frozen=True)
class ProbeResult:
    """The head for raw embeddings (``weight`` (classes, dim), ``bias`` (classes,)) and how it was chosen."""

    weight: np.ndarray
    bias: np.ndarray
    chosen: dict
    val_balanced_accuracy: float
    trials: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        return np.argmax(vectors.astype(np.float32) @ self.weight.T + self.bias, axis=1)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {"weight": torch.from_numpy(self.weight.astype(np.float32)),
                "bias": torch.from_numpy(self.bias.astype(np.float32))}

    def record(self, config: ProbeConfig) -> dict:
        return {"config": asdict(config), "chosen": self.chosen, "val_balanced_accuracy": self.val_balanced_accuracy,
                "trials": self.trials, "train_seconds": round(self.seconds, 3)}


def train_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, n_classes: int,
                config: ProbeConfig = ProbeConfig()) -> ProbeResult:
    """The best linear head on the validation split (see the module docstring)."""
    _check(train_x, train_y, "train", n_classes)
    _check(val_x, val_y, "val", n_classes)
    if train_x.shape[1] != val_x.shape[1]:
        raise InvalidParameterError(f"train and val embeddings differ in size ({train_x.shape[1]} vs {val_x.shape[1]})")
    started = time.perf_counter()
    mean = train_x.mean(axis=0, dtype=np.float64)
    std = train_x.std(axis=0, dtype=np.float64)
    std[std < 1e-6] = 1.0  # constant features: leave them as they are
    train_z = ((train_x - mean) / std).astype(np.float32)
    val_z = ((val_x - mean) / std).astype(np.float32)
    fit = _fit_adamw if config.method == "adamw" else _fit_lbfgs
    trials = []
    best = None
    for setting, weight, bias in fit(train_z, train_y, val_z, val_y, n_classes, config):
        logits = val_z @ weight.T + bias
        score = float(balanced_accuracy_score(val_y, logits.argmax(axis=1)))
        loss = float(log_loss(val_y, _softmax(logits), labels=list(range(n_classes))))
        trials.append({**setting, "val_balanced_accuracy": round(score, 5), "val_loss": round(loss, 5)})
        if best is None or (score, -loss) > (best[0], -best[1]):
            best = (score, loss, setting, weight, bias)
    score, _, setting, weight, bias = best
    raw_weight = weight / std.astype(np.float32)  # fold the standardisation into the layer
    raw_bias = bias - raw_weight @ mean.astype(np.float32)
    return ProbeResult(raw_weight, raw_bias, setting, score, trials, time.perf_counter() - started)


def _check(x: np.ndarray, y: np.ndarray, split: str, n_classes: int) -> None:
    if x.ndim != 2 or len(x) == 0 or len(x) != len(y):
        raise InvalidParameterError(f"{split} split: need a non-empty (n, dim) embedding matrix and n labels, "
                                    f"got {x.shape} and {len(y)} labels")
    if y.min() < 0 or y.max() >= n_classes:
        raise InvalidParameterError(f"{split} split: labels must lie in 0..{n_classes - 1}")
    if not np.isfinite(x).all():
        raise InvalidParameterError(f"{split} split: embeddings hold NaN or infinite values; re-extract them")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _fit_adamw(train_x, train_y, val_x, val_y, n_classes, config: ProbeConfig):
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y.astype(np.int64))
    vx, vy = torch.from_numpy(val_x), torch.from_numpy(val_y.astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss()
    for lr in config.learning_rates:
        for weight_decay in config.weight_decays:
            generator = torch.Generator().manual_seed(config.seed)
            layer = torch.nn.Linear(x.shape[1], n_classes)
            with torch.no_grad():  # seeded initialisation, independent of the global random state
                bound = 1 / math.sqrt(x.shape[1])
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
            optimiser = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
            best_loss, best_state, best_epoch, stale = math.inf, None, 0, 0
            for epoch in range(1, config.max_epochs + 1):
                order = torch.randperm(len(x), generator=generator)
                for start in range(0, len(x), config.batch_size):
                    index = order[start:start + config.batch_size]
                    optimiser.zero_grad(set_to_none=True)
                    loss_fn(layer(x[index]), y[index]).backward()
                    optimiser.step()
                with torch.no_grad():
                    val_loss = float(loss_fn(layer(vx), vy))
                if val_loss < best_loss - 1e-6:
                    best_loss, best_epoch, stale = val_loss, epoch, 0
                    best_state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
                else:
                    stale += 1
                    if stale >= config.patience:
                        break
            setting = {"method": "adamw", "lr": lr, "weight_decay": weight_decay, "best_epoch": best_epoch,
                       "epochs_run": epoch}
            yield setting, best_state["weight"].numpy(), best_state["bias"].numpy()


def _fit_lbfgs(train_x, train_y, val_x, val_y, n_classes, config: ProbeConfig):
    for c in config.c_values:
        model = LogisticRegression(C=c, max_iter=2000, random_state=config.seed)
        model.fit(train_x, train_y)
        weight = np.zeros((n_classes, train_x.shape[1]), dtype=np.float32)
        bias = np.full(n_classes, -1e4, dtype=np.float32)  # a class absent from train is never predicted
        if len(model.classes_) == 2 and model.coef_.shape[0] == 1:  # binary: one row, for class 1
            weight[model.classes_[1]], bias[model.classes_[1]] = model.coef_[0], model.intercept_[0]
            weight[model.classes_[0]], bias[model.classes_[0]] = 0.0, 0.0
        else:
            weight[model.classes_] = model.coef_
            bias[model.classes_] = model.intercept_
        yield {"method": "lbfgs", "C": c, "iterations": int(np.max(model.n_iter_))}, weight, bias
