"""Where issue #28's zero-label target stands: on the evaluation set of adapt_bench.py (per site,
the held-out half of its photos less calibrate's k photos), each column's accuracy and its gain
over the unadapted model, paired on the same images (photo-grouped bootstrap 95 % CI):

- zero-shot, `bn` (crackcore.adaptation's default: BN statistics + the EM prior) and its
  `self-train`;
- two stronger zero-label methods that are NOT in crackcore, tried here to see whether one would
  reach the target: SHOT (Liang, Hu & Feng, ICML 2020: source-free, fc frozen, the backbone trained
  by information maximisation plus pseudo-labels from feature-space clustering) and DANN-style
  joint training (Ganin et al., JMLR 2016: the model's own concrete training images with their
  labels, the site's images without, a gradient-reversed domain classifier, and the site's
  prediction entropy down and its class balance up);
- the LABELLED ceiling: what the same model reaches when the adapt half's labels are given,
  a logistic-regression probe on its (AdaBN) features (C by 5-fold CV on that half) and a full
  fine-tune (10 epochs, SGD lr 0.003, flip_rotate). A zero-label method that lands near them
  has taken most of what the features hold.

    PYTHONPATH=$PWD python experiments/adapt_ceiling.py --model MODEL.pt --out ceiling.json

Figures, not a test; one seed per column (methods that train are seeded).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegressionCV
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapt_bench import SITES, site_split  # noqa: E402

from crackcore.adapt import load_net  # noqa: E402
from crackcore.adaptation import adapt_model, entropy, logit_crack, reestimate_bn, train_prior_of  # noqa: E402
from crackcore.calibrate import GROUP_BY, decode_all, site_samples  # noqa: E402
from crackcore.classifier import load_torch_meta, temperature_of, threshold_of  # noqa: E402
from crackcore.data import model_inputs  # noqa: E402
from crackcore.metrics import paired_difference, wilson_interval  # noqa: E402
from crackcore.model import CrackResNet  # noqa: E402

BATCH, POLICY = 32, "flip_rotate"


def features(net: CrackResNet, x: torch.Tensor) -> torch.Tensor:
    """The 512-d pooled features fc reads: torchvision's ResNet forward, every child but fc."""
    return torch.flatten(nn.Sequential(*list(net.children())[:-1])(x), 1)


@torch.no_grad()
def all_features(net: CrackResNet, images: torch.Tensor) -> torch.Tensor:
    net.eval()
    return torch.cat([features(net, model_inputs(b)) for b in images.split(256)])


def balance(p: torch.Tensor) -> torch.Tensor:
    """Entropy of the batch's mean prediction: high when both classes are predicted."""
    m = p.mean(0)
    return -(m * m.clamp_min(1e-8).log()).sum()


@torch.no_grad()
def cluster_labels(net: CrackResNet, images: torch.Tensor) -> torch.Tensor:
    """SHOT's pseudo-labels: class centroids weighted by the predictions, nearest centroid by
    cosine, once more with the hard labels."""
    f = all_features(net, images)
    w = net.fc(f).softmax(1)
    f = F.normalize(torch.cat([f, torch.ones(len(f), 1)], 1), dim=1)
    for _ in range(2):
        c = F.normalize(w.T @ f / (w.sum(0)[:, None] + 1e-8), dim=1)
        w = F.one_hot((f @ c.T).argmax(1), 2).float()
    return w.argmax(1)


def shot(net: CrackResNet, images: torch.Tensor, seed: int, epochs: int = 5, lr: float = 0.01,
         beta: float = 0.3) -> None:
    reestimate_bn(net, images)
    params = [p for n, p in net.named_parameters() if not n.startswith("fc.")]
    for p in net.fc.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        pseudo = cluster_labels(net, images)
        net.train()
        for idx in torch.randperm(len(images), generator=gen).split(BATCH):
            if len(idx) < 2:
                continue
            logits = net(model_inputs(images[idx])).float()
            loss = entropy(logits).mean() - balance(logits.softmax(1)) + beta * F.cross_entropy(logits, pseudo[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    reestimate_bn(net, images)


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return -ctx.lam * grad, None


def dann(net: CrackResNet, images: torch.Tensor, source: torch.Tensor, source_labels: torch.Tensor, seed: int,
         epochs: int = 5, lr: float = 0.003, im_weight: float = 0.3) -> None:
    """Each step: a batch of each domain through their own BN batch statistics; source
    cross-entropy + the domain classifier's loss through gradient reversal (weight ramped
    0 -> 1 as in Ganin et al.) + im_weight x (site entropy - site balance); BN statistics of the
    site at the end (AdaBN), so the site's model runs with its own."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    disc = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 2))
    opt = torch.optim.SGD([*net.parameters(), *disc.parameters()], lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    steps, step = epochs * max(1, len(images) // BATCH), 0
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(images), generator=gen).split(BATCH):
            if len(idx) < 8:
                continue
            sidx = torch.randint(len(source), (BATCH,), generator=gen)
            fs = features(net, model_inputs(source[sidx], POLICY, gen))
            ft = features(net, model_inputs(images[idx], POLICY, gen))
            lam = 2 / (1 + np.exp(-10 * step / steps)) - 1
            step += 1
            domain = disc(_Reverse.apply(torch.cat([fs, ft]), lam))
            pt = net.fc(ft).float()
            loss = (F.cross_entropy(net.fc(fs), source_labels[sidx])
                    + F.cross_entropy(domain, torch.cat([torch.zeros(len(fs)), torch.ones(len(ft))]).long())
                    + im_weight * (entropy(pt).mean() - balance(pt.softmax(1))))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    reestimate_bn(net, images)


def fine_tune(net: CrackResNet, images: torch.Tensor, labels: np.ndarray, seed: int, epochs: int = 10,
              lr: float = 0.003) -> None:
    gen, y = torch.Generator().manual_seed(seed), torch.as_tensor(labels)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(images), generator=gen).split(BATCH):
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(net(model_inputs(images[idx], POLICY, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()


def probe(net: CrackResNet, images: torch.Tensor, labels: np.ndarray, scored: torch.Tensor, seed: int) -> np.ndarray:
    """Crack log-odds of a logistic regression on the AdaBN features of the labelled half."""
    reestimate_bn(net, images)
    fa, fx = all_features(net, images).numpy(), all_features(net, scored).numpy()
    mu, sd = fa.mean(0), fa.std(0) + 1e-6
    clf = LogisticRegressionCV(Cs=8, cv=5, scoring="neg_log_loss", l1_ratios=(0.0,), use_legacy_attributes=False,
                               max_iter=2000, random_state=seed).fit((fa - mu) / sd, labels)
    return clf.decision_function((fx - mu) / sd)


def concrete_source(model: Path, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of the model's own training split, with their labels (DANN's source)."""
    meta = load_torch_meta(model)
    split = pd.read_parquet(model.parent / "split.parquet")
    train = split[split["split"] == "train"]
    train = train.sample(min(n, len(train)), random_state=seed)
    root = Path(str((meta.get("config") or {}).get("data") or ""))
    if not (root / train["path"].iloc[0]).exists():
        raise SystemExit(f"{model}: its training folder {root} is not here; DANN needs it")
    imgs, ok = decode_all(root, train["path"], int(meta["image_size"]))
    return imgs, torch.as_tensor(train["label"].to_numpy()[ok])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--k", type=int, default=50, help="as adapt_bench.py: the photos calibrate would draw are not scored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source-n", type=int, default=600, help="training images DANN sees")
    a = p.parse_args()
    meta = load_torch_meta(a.model)
    size, temperature, threshold = int(meta["image_size"]), temperature_of(meta), threshold_of(meta)
    source, source_labels = concrete_source(a.model, a.source_n, a.seed)
    results: dict = {"model": str(a.model), "weights": meta.get("weights"), "sites": {}}
    for name, root in SITES.items():
        sp = site_split(Path(root), site_samples(Path(root), GROUP_BY), size, a.k, a.seed)
        rest, labels, groups = sp["rest"], sp["labels"][sp["rest"]], sp["groups"][sp["rest"]]
        base = load_net(meta, torch.device("cpu"))
        site: dict = {"n_adapt": len(sp["adapt_imgs"]), "n_scored": int(rest.sum()), "columns": {}}
        print(f"{name}: adapt on {site['n_adapt']}, score {site['n_scored']}", flush=True)
        correct0 = None
        for col in ("zero-shot", "bn", "self-train", "shot", "dann", "labels: probe", "labels: fine-tune"):
            net, t0 = copy.deepcopy(base), time.time()
            torch.manual_seed(a.seed)
            if col in ("bn", "self-train"):
                adapt_model(net, sp["adapt_imgs"], col, temperature=temperature, train_prior=train_prior_of(meta),
                            seed=a.seed)
            elif col == "shot":
                shot(net, sp["adapt_imgs"], a.seed)
            elif col == "dann":
                dann(net, sp["adapt_imgs"], source, source_labels, a.seed)
            elif col == "labels: fine-tune":
                fine_tune(net, sp["adapt_imgs"], sp["adapt_labels"], a.seed)
            if col == "labels: probe":  # its own logistic scale: decided at 0.5
                pred = probe(net, sp["adapt_imgs"], sp["adapt_labels"], sp["imgs"], a.seed)[rest] >= 0
            else:
                pred = 1 / (1 + np.exp(-logit_crack(net, sp["imgs"])[rest] / temperature)) >= threshold
            correct = (pred.astype(int) == labels).astype(int)
            correct0 = correct if correct0 is None else correct0
            gain = paired_difference(correct, correct0, groups, seed=a.seed)
            negatives = labels == 0
            c = {"accuracy": float(correct.mean()), "accuracy_ci95": list(wilson_interval(int(correct.sum()), len(correct))),
                 "false_alarm_rate": float(pred[negatives].mean()), "n": len(correct),
                 "gain": gain["difference"], "gain_ci95": [gain["ci95_low"], gain["ci95_high"]],
                 "n_photos": gain["n_groups"], "seconds": time.time() - t0}
            site["columns"][col] = c
            print(f"  {col:<18} acc {100 * c['accuracy']:.1f} ({100 * c['accuracy_ci95'][0]:.1f}-"
                  f"{100 * c['accuracy_ci95'][1]:.1f})  gain {100 * c['gain']:+.1f} ({100 * gain['ci95_low']:+.1f}.."
                  f"{100 * gain['ci95_high']:+.1f})  false alarms {100 * c['false_alarm_rate']:.1f}  "
                  f"({c['seconds']:.0f} s)", flush=True)
        results["sites"][name] = site
        a.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
