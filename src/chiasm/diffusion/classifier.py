"""A small CNN classifier trained by chiasm on the same domain: the judge of generated samples.

FID is usually computed on Inception-v3 features, whose weights cannot be downloaded here.
Features of a classifier trained on the domain itself are what "FID" means in the MNIST
literature too, and they have to be named for it (FID-FMNIST, FID-DIGITS): the numbers are
comparable between models judged by the same classifier, not with published Inception FIDs.
The classifier also says which class a sample looks like (the recognition rate).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from chiasm.diffusion.data import ImageSet
from chiasm.errors import ModelFolderError

log = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """Two conv stages and a 128-wide feature layer (the FID features), then the class logits."""

    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Judge:
    """A trained classifier with its class names: features, predictions, accuracy."""

    def __init__(self, net: SmallCNN, classes: list[str], info: dict) -> None:
        self.net, self.classes, self.info = net.eval(), classes, info

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
        return torch.cat([self.net.features(x[i:i + batch]) for i in range(0, len(x), batch)]).double()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
        return torch.cat([self.net(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.net.state_dict(), str(folder / "classifier.safetensors"))
        (folder / "classifier.json").write_text(json.dumps({"classes": self.classes, **self.info}, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Judge:
        folder = Path(folder)
        meta_path = folder / "classifier.json"
        if not meta_path.is_file():
            raise ModelFolderError(f"{folder} is not a classifier folder (no classifier.json); "
                                   "train one with chiasm diffusion eval --train-classifier")
        meta = json.loads(meta_path.read_text())
        net = SmallCNN(meta["channels"], len(meta["classes"]))
        net.load_state_dict(load_file(str(folder / "classifier.safetensors")))
        return cls(net, meta["classes"], {k: v for k, v in meta.items() if k != "classes"})


def train_classifier(train: ImageSet, test: ImageSet, *, steps: int = 600, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0) -> Judge:
    """Adam with light augmentation (a one-pixel shift); reports held-out accuracy in ``info``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = SmallCNN(train.images.shape[1], len(train.classes))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, len(train), (batch_size,), generator=gen)
        x = train.images[idx]
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(net(x), train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log.info("classifier step %d/%d loss %.3f", step + 1, steps, float(loss))
    judge = Judge(net, train.classes, {"channels": train.images.shape[1], "size": train.images.shape[-1]})
    judge.info["test_accuracy"] = float((judge.predict(test.images) == test.labels).float().mean())
    log.info("classifier held-out accuracy %.4f", judge.info["test_accuracy"])
    return judge
