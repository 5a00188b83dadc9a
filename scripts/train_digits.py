"""Train the bundled digits demo models and write their weights into ``src/edgequant/assets``.

Run from the repository root: ``python scripts/train_digits.py``. Training is CPU-only and seeded so the
shipped ``.pt`` files can be regenerated (identically on the same torch build); it takes well under a
minute per model on two cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgequant.demo.digits import build_model, evaluate_accuracy, load_digits_tensors

ASSETS = Path(__file__).resolve().parents[1] / "src" / "edgequant" / "assets"


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random +-1 pixel shifts: cheap augmentation that keeps the tiny nets from overfitting 1.3k images."""
    padded = F.pad(x, (1, 1, 1, 1), value=float(x.min()))
    out = torch.empty_like(x)
    offsets = torch.randint(0, 3, (x.shape[0], 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + 8, dx : dx + 8]
    return out


def train(name: str, epochs: int, lr: float, seed: int = 0) -> tuple[nn.Module, float]:
    """Train one demo model with Adam + cosine LR; return the eval-mode model and its test accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digits_tensors("train")
    x_test, y_test = load_digits_tensors("test")
    model = build_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batch = 64
    steps = epochs * ((len(y_train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen)
        for start in range(0, len(perm), batch):
            idx = perm[start : start + batch]
            loss = F.cross_entropy(model(_augment(x_train[idx], gen)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, evaluate_accuracy(model, x_test, y_test)


def main() -> None:
    """Train both models, report accuracy, save the state dicts as package data."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()

    torch.set_num_threads(1)  # single-threaded CPU kernels keep results reproducible across machines
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("digits_cnn", "digits_dwcnn"):
        t0 = time.perf_counter()
        model, acc = train(name, args.epochs, args.lr)
        path = args.out / f"{name}.pt"
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
        print(
            f"{name}: test accuracy {acc * 100:.2f}%  ({time.perf_counter() - t0:.1f}s, "
            f"{path.stat().st_size / 1024:.1f} KiB -> {path})"
        )
        if acc < 0.95:
            raise SystemExit(f"{name} below the 95% target ({acc:.4f})")


if __name__ == "__main__":
    main()
