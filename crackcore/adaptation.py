"""Adapting a trained model to a site from the site's UNLABELLED uint8 images: BatchNorm
statistics re-estimated there (bn, AdaBN), entropy minimisation on the BN affine parameters
(tent), or self-training on confident pseudo-labels (self-train); then the site's crack prior by
EM (Saerens, Latinne & Decaestecker 2002) folded into fc's bias. The library under both
`python -m crackcore.adapt` (a saved model) and `crackcore.train.fit` (a held-out source scored
adapted, TrainConfig.adapt_to). Labels never enter any function here."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from crackcore.config import ADAPT_METHODS
from crackcore.data import model_inputs
from crackcore.exceptions import ConfigError
from crackcore.model import CrackResNet

METHODS = ADAPT_METHODS
BN_LAYERS = ("trained", "all", "deep", "shallow")  # see bn_modules
DEFAULT_BN_LAYERS = "trained"
BATCH = 64
TENT_LR, TENT_EPOCHS = 1e-3, 2
SELF_LR, SELF_EPOCHS, SELF_CONFIDENCE, SELF_POLICY = 1e-3, 3, 0.9, "strong"
SELF_TRAINS = "bn-affine+layer4+fc"  # what self-train updates (the rest stays as bn left it)
# Below this share of the confident predictions it started from, self-train has turned the model
# against its own pseudo-labels (the per-batch relabelling this replaced kept 3-15 % on quay
# walls, accuracy 66 -> 26 %; 93-99.7 % where sound): such a model is not written by
# crackcore.adapt and is flagged by fit.
SELF_MIN_KEPT = 0.5
EM_MAX_ITER, EM_TOL = 200, 1e-6
# An EM estimate outside this band is taken for EM running away on overconfident probabilities,
# not for a site: measured on a 4-epoch random-init model, quay walls (true share 0.64) went to
# 0.99999 and the shift called every window a crack. Such a shift is not applied (BN alone).
PRIOR_BAND = (0.02, 0.98)
BN_RULE = {
    "trained": "re-estimate the BN layers of the stages that were trained (freeze_depth onwards); frozen stages keep "
               "the statistics their downstream layers were trained with",
    "all": "re-estimate every BN layer, frozen stages included",
    "deep": "re-estimate the BN layers of layer3 and layer4 only (trained ones)",
    "shallow": "re-estimate the BN layers of the stem, layer1 and layer2 only (trained ones)",
}


# --------------------------------------------------------------------------- the methods


def bn_modules(net: CrackResNet, layers: str) -> list[nn.BatchNorm2d]:
    """The BatchNorm layers `layers` (BN_LAYERS, BN_RULE) re-estimates, in forward order."""
    stages = [[net.conv1, net.bn1], [net.layer1], [net.layer2], [net.layer3], [net.layer4]]
    frozen = getattr(net, "freeze_depth", 0)
    picked = {"trained": range(frozen, 5), "all": range(5), "deep": range(max(3, frozen), 5),
              "shallow": range(frozen, 3)}[layers]
    return [m for i in picked for part in stages[i] for m in part.modules() if isinstance(m, nn.BatchNorm2d)]


def batches(images: torch.Tensor, batch_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    order = torch.randperm(len(images), generator=generator) if generator is not None else torch.arange(len(images))
    return [images[i] for i in order.split(batch_size)]


@torch.no_grad()
def reestimate_bn(net: CrackResNet, images: torch.Tensor, layers: str = DEFAULT_BN_LAYERS, mix: float = 1.0,
                  batch_size: int = BATCH) -> list[str]:
    """AdaBN: the chosen BN layers' running mean/var become the site's (a cumulative average over
    all of `images`, so batch order does not matter), mixed `mix` : 1 - mix with the old ones;
    every other layer is untouched. Returns the names of the layers changed."""
    if not 0 < mix <= 1:
        raise ConfigError(f"--bn-mix {mix} must be in (0, 1]: the share of the site's statistics")
    chosen = bn_modules(net, layers)
    names = {m: n for n, m in net.named_modules()}
    old = {m: (m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in chosen}
    net.eval()
    for m in chosen:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: exact mean over the batches
        m.train()
    device = next(net.parameters()).device
    for b in batches(images, batch_size):
        net(model_inputs(b.to(device)))
    for m, (mean, var, momentum) in old.items():
        m.running_mean.mul_(mix).add_(mean, alpha=1 - mix)
        m.running_var.mul_(mix).add_(var, alpha=1 - mix)
        m.momentum = momentum
    net.eval()
    return [names[m] for m in chosen]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.float().log_softmax(1)
    return -(logp.exp() * logp).sum(1)


def bn_affine(modules: list[nn.BatchNorm2d]) -> list[nn.Parameter]:
    return [p for m in modules for p in (m.weight, m.bias)]


@contextlib.contextmanager
def training_only(net: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Gradients for `params` alone while inside; every parameter's requires_grad as it was after."""
    state = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, g in zip(net.parameters(), state):
            p.requires_grad_(g)
        net.eval()


def tent(net: CrackResNet, images: torch.Tensor, layers: str = DEFAULT_BN_LAYERS, epochs: int = TENT_EPOCHS,
         lr: float = TENT_LR, seed: int = 0, batch_size: int = BATCH) -> dict[str, Any]:
    """TENT: the chosen BN layers in train mode (batch statistics) and their affine parameters
    alone trained by Adam to lower the mean prediction entropy of the site's batches (seeded
    order); then their running statistics re-estimated under the new affine parameters, so the
    saved model runs in eval mode like any other."""
    reestimate_bn(net, images, layers, batch_size=batch_size)
    chosen = bn_modules(net, layers)
    params = bn_affine(chosen)
    opt = torch.optim.Adam(params, lr=lr)
    gen, device, losses = torch.Generator().manual_seed(seed), next(net.parameters()).device, []
    with training_only(net, params):
        for _ in range(epochs):
            net.eval()
            for m in chosen:
                m.train()
            for b in batches(images, batch_size, gen):
                if len(b) < 2:  # batch statistics of one image are undefined
                    continue
                loss = entropy(net(model_inputs(b.to(device)))).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    reestimate_bn(net, images, layers, batch_size=batch_size)
    return {"epochs": epochs, "lr": lr, "optimizer": "Adam", "batch_size": batch_size, "steps": len(losses),
            "entropy_first": losses[0] if losses else None, "entropy_last": losses[-1] if losses else None}


def self_train(net: CrackResNet, images: torch.Tensor, layers: str = DEFAULT_BN_LAYERS, epochs: int = SELF_EPOCHS,
               lr: float = SELF_LR, confidence: float = SELF_CONFIDENCE, policy: str = SELF_POLICY, seed: int = 0,
               batch_size: int = BATCH) -> dict[str, Any]:
    """Self-training with a fixed teacher (Noisy-Student style, one round): after bn, the model's
    own eval-mode predictions on the images themselves are the pseudo-labels, made ONCE; the
    images whose top probability is >= `confidence` are trained on a strong view (`policy`,
    crackcore.augment) with cross-entropy weighted by the inverse share of their pseudo-class in
    the batch (so a site the model leans on cannot collapse to one class). Only the BN affine
    parameters, layer4 and fc learn (SELF_TRAINS); BN statistics are re-estimated at the end.
    Why once: relabelling each batch with the model being trained (FixMatch) fed its drifting BN
    running statistics back into its own targets and inverted it on 4 of 6 wall splits (3-15 % of
    the start kept); with the labels fixed none inverted (93-99 % kept).
    `start_labels_kept`: the share of the images confident at the start whose class the end model
    keeps; `inverted` below SELF_MIN_KEPT."""
    reestimate_bn(net, images, layers, batch_size=batch_size)
    start_conf, start_label = predictions(net, images)
    anchored = start_conf >= confidence
    chosen = bn_modules(net, layers)
    params = list({id(p): p for p in [*bn_affine(chosen), *net.layer4.parameters(), *net.fc.parameters()]}.values())
    opt = torch.optim.Adam(params, lr=lr)
    gen, device = torch.Generator().manual_seed(seed), next(net.parameters()).device
    used, seen, losses = 0, 0, []
    with training_only(net, params):
        for _ in range(epochs):
            for idx in torch.randperm(len(images), generator=gen).split(batch_size):
                keep, pseudo = anchored[idx], start_label[idx].to(device)
                seen += len(idx)
                if keep.sum() < 2:
                    continue
                used += int(keep.sum())
                counts = torch.bincount(pseudo[keep], minlength=2).float()
                weight = (counts.sum() / (2 * counts.clamp(min=1)))
                net.eval()
                for m in chosen:  # batch statistics in the chosen layers only, as tent
                    m.train()
                logits = net(model_inputs(images[idx[keep]].to(device), policy, gen))
                loss = nn.functional.cross_entropy(logits.float(), pseudo[keep], weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    net.eval()
    reestimate_bn(net, images, layers, batch_size=batch_size)
    _, end_label = predictions(net, images)
    kept = float((end_label[anchored] == start_label[anchored]).float().mean()) if anchored.any() else None
    return {"epochs": epochs, "lr": lr, "optimizer": "Adam", "batch_size": batch_size, "confidence": confidence,
            "strong_policy": policy, "trains": SELF_TRAINS, "pseudo_labelled_share": used / max(1, seen),
            "steps": len(losses), "loss_last": losses[-1] if losses else None,
            "start_confident": int(anchored.sum()), "start_labels_kept": kept,
            "inverted": kept is not None and kept < SELF_MIN_KEPT}


def inverted_text(record: dict[str, Any]) -> str | None:
    """What self-train did wrong, if it turned the model against its start (SELF_MIN_KEPT)."""
    st = record.get("self_train") or {}
    if not st.get("inverted"):
        return None
    return (f"self-train turned the model against its own start: it keeps {100 * st['start_labels_kept']:.0f} % of "
            f"the {st['start_confident']} confident predictions it trained from (under {100 * SELF_MIN_KEPT:.0f} %)")


def predictions(net: CrackResNet, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top probability and class of every image, in eval mode (of two classes: sigmoid(|z|) and z > 0
    for the crack log-odds z)."""
    z = torch.from_numpy(logit_crack(net, images))
    return torch.sigmoid(z.abs()), (z > 0).long()


# --------------------------------------------------------------------------- the prior


def em_prior(prob_crack: np.ndarray, train_prior: float, max_iter: int = EM_MAX_ITER, tol: float = EM_TOL
             ) -> tuple[float, int]:
    """Saerens et al. 2002: the crack prior of the set the posteriors `prob_crack` (made under
    `train_prior`) come from, by EM; returns (prior, iterations)."""
    p = np.clip(np.asarray(prob_crack, dtype=float), 1e-12, 1 - 1e-12)
    prior = train_prior
    for it in range(1, max_iter + 1):
        a, b = prior / train_prior * p, (1 - prior) / (1 - train_prior) * (1 - p)
        new = float(np.mean(a / (a + b)))
        if abs(new - prior) < tol:
            return new, it
        prior = new
    return prior, max_iter


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def train_prior_of(meta: dict[str, Any]) -> float:
    """The crack share the model was trained under: that of its test split (the split is
    stratified), else 0.5."""
    t = (meta.get("test_metrics") or {})
    if t.get("tp") is not None and t.get("n"):
        return float((t["tp"] + t["fn"]) / t["n"])
    return 0.5


def apply_prior_shift(net: CrackResNet, offset: float, temperature: float) -> None:
    """Add `offset` to the crack log-odds prob_crack is made of, inside fc: both classes' biases
    move by T*offset/2 so that (z1 - z0)/T grows by `offset`. Every runtime (model.pt, the ONNX
    export, calibrate) then sees the prior-corrected posterior with nothing new to apply."""
    with torch.no_grad():
        net.fc.bias[1] += temperature * offset / 2
        net.fc.bias[0] -= temperature * offset / 2


# --------------------------------------------------------------------------- driving it


@torch.inference_mode()
def logit_crack(net: CrackResNet, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    net.eval()
    device = next(net.parameters()).device
    out = [net(model_inputs(b.to(device))).float().cpu() for b in images.split(batch_size)]
    z = torch.cat(out) if out else torch.zeros(0, 2)
    return (z[:, 1] - z[:, 0]).double().numpy()


def adapt_model(net: CrackResNet, images: torch.Tensor, method: str, *, temperature: float = 1.0,
                train_prior: float = 0.5, layers: str = DEFAULT_BN_LAYERS, mix: float = 1.0, seed: int = 0,
                prior: bool = True, epochs: int | None = None) -> dict[str, Any]:
    """Adapt `net` in place to the uint8 site `images` by `method` (METHODS), then (with `prior`)
    fold the site's EM prior into fc. Returns the settings and the prior estimate."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if layers not in BN_LAYERS:
        raise ConfigError(f"--bn-layers {layers!r} is unknown; use one of {', '.join(BN_LAYERS)}")
    torch.manual_seed(seed)
    t0 = time.time()
    record: dict[str, Any] = {"method": method, "bn_layers": layers, "bn_rule": BN_RULE[layers], "bn_mix": mix,
                              "seed": seed}
    if method == "bn":
        record["bn_changed"] = reestimate_bn(net, images, layers, mix)
    elif method == "tent":
        record["tent"] = tent(net, images, layers, epochs if epochs is not None else TENT_EPOCHS, seed=seed)
    else:
        record["self_train"] = self_train(net, images, layers, epochs if epochs is not None else SELF_EPOCHS, seed=seed,
                                            confidence=SELF_CONFIDENCE)
    prob = 1 / (1 + np.exp(-logit_crack(net, images) / temperature))
    site_prior, iterations = em_prior(prob, train_prior)
    ran_away = not PRIOR_BAND[0] <= site_prior <= PRIOR_BAND[1]
    applied = prior and not ran_away
    offset = logit(site_prior) - logit(train_prior) if applied else 0.0
    if applied:
        apply_prior_shift(net, offset, temperature)
    record["prior"] = {"method": "EM on the adapted model's temperature-scaled probabilities (Saerens et al. 2002)",
                       "train_prior": train_prior, "site_prior": site_prior, "iterations": iterations,
                       "mean_prob_crack": float(prob.mean()), "requested": prior, "applied": applied,
                       "band": list(PRIOR_BAND), "ran_away": ran_away, "logit_offset": offset,
                       "where": "added to the crack log-odds through fc.bias"}
    return {**record, "seconds": time.time() - t0}
