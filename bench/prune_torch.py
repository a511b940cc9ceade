#!/usr/bin/python3
"""PyTorch side of the pruning benchmark (bench/prune_bench.sh): the four
pruning methods of topiary's pipeline, written again with PyTorch 1.13 on the
torchvision definition of the same architecture, with the same stages and
timers, so that the two can be timed side by side.

usage:
  prune_torch.py --arch mobilenet_v2|resnet50 --method magnitude|obd|obs|layer_obs
                 --data DIR [--images N] [--fit-images N] [--eval-images N]
                 [--bn-correction match-dense|none] [--sparsity Q] [--batch B]

Prints one JSON line: status ("ok" or "rejected" with a message), the
stage timings in seconds (the names of topiary's report), the prunable
weight count and the achieved sparsity.

What each method computes (q the sparsity, n calibration images):
  prunable   conv weights before the global pool except the first conv; the
             classifier is after the pool, so it stays dense.
  mask       global: exactly round(q * total) weights with the lowest scores,
             ties taken in (layer, index) order.
  magnitude  s = |w|.
  obd        F = (1/n) sum over images of g^2 (empirical Fisher diagonal from
             one backward per image of the cross-entropy of a fixed ridge
             head on the pooled features), lambda = 1e-3 * mean(F),
             s = 0.5 w^2 (F + lambda).
  obs        blocks of 64 consecutive weights of a flattened layer,
             F_B = (1/n) G_B^T G_B + lambda I, s = w^2 / (2 [F_B^-1]_ii), then
             after the mask the OBS update delta = -F^-1[:, P] (F^-1[P, P])^-1 w_P.
             Rejected, as topiary does, when the per-sample gradients and the
             workspace exceed --obs-memory MiB.
  layer_obs  per layer in graph order, on the inputs of the model whose
             earlier layers are already pruned: at most 4096 im2col rows X
             sampled over the calibration images, H = 2 X^T X / rows,
             (H + 0.01 mean(diag H) I)^-1 = U^T U, columns in blocks of 128,
             each block's mask the lowest w^2 / U_jj^2 over all rows, the
             error w_j / U_jj propagated to the later columns. Each group of
             a grouped conv (each channel of a depthwise one) is its own
             problem, with its zero count from a global magnitude mask.
  bn         match-dense: the dense model's BN input mean and variance on
             the calibration images, then per BN layer in graph order one
             full pass over them and the running statistics moved so that
             the pruned input has the dense mean and spread.

The head is a ridge regression (alpha 1, one-hot targets, intercept) on the
pooled features of --fit-images other images, like topiary's, without its
class balancing. Weights are torchvision's random initialisation (seed 0),
so the figures are wall times, not accuracies. Images: Fashion-MNIST, gray
replicated to RGB, bilinear resize to 224 px (align_corners), scaled to [0, 1]
for MobileNetV2 and normalised with the ImageNet mean and std for ResNet-50.
Threads: torch.set_num_threads(2).
"""
import argparse
import gzip
import json
import os
import resource
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TIMERS = ("load", "dense_features", "saliency", "mask", "update", "bn_recalibration",
          "pruned_eval", "total")


class Rejected(Exception):
    """The run stops before pruning, as topiary's pipeline would."""


# ---- data ---------------------------------------------------------------------


def read_idx(images_gz, labels_gz):
    """Returns (N, 28, 28) uint8 images and (N) int64 labels of an IDX pair."""
    with gzip.open(images_gz, "rb") as f:
        raw = f.read()
    count, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    images = np.frombuffer(raw, np.uint8, count * rows * cols, 16).reshape(count, rows, cols)
    with gzip.open(labels_gz, "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, count, 8).astype(np.int64)
    return images, labels


def class_balanced(labels, count, seed):
    """Indices of `count` images, about count / classes per class, mixed."""
    rng = np.random.RandomState(seed)
    classes = np.unique(labels)
    per_class = -(-count // len(classes))
    picked = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        picked.append(idx[:per_class])
    out = np.concatenate(picked)
    rng.shuffle(out)
    return out[:count]


def preprocess(images, normalise):
    """(B, 28, 28) uint8 -> (B, 3, 224, 224) float32."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
    x = x.expand(-1, 3, -1, -1)
    if normalise:
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


def batches(images, batch, normalise):
    for b0 in range(0, len(images), batch):
        yield b0, preprocess(images[b0:b0 + batch], normalise)


# ---- model --------------------------------------------------------------------


def build(arch):
    """Returns the eval-mode model, its pooled-feature function and the
    prunable convs in graph order."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    if arch == "mobilenet_v2":
        def features(x):
            return F.adaptive_avg_pool2d(model.features(x), 1).flatten(1)
    else:
        def features(x):
            m = model
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
            return m.avgpool(x).flatten(1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return model, features, convs[1:]


def ridge_head(feats, labels, alpha=1.0):
    """Least-squares head: W (C, D), b (C) from one-hot targets, in double."""
    x = feats.double()
    y = F.one_hot(labels, int(labels.max()) + 1).double()
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    a = xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(a, xc.T @ yc).T
    b = ym - w @ xm
    return w.float(), b.float()


@torch.no_grad()
def pooled(features, images, batch, normalise):
    return torch.cat([features(x) for _, x in batches(images, batch, normalise)])


# ---- masks --------------------------------------------------------------------


def global_masks(scores, sparsity):
    """Keep masks (bool, per layer) that prune exactly round(q * total) of the
    lowest scores over all layers, ties in (layer, index) order."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    total = flat.numel()
    r = int(np.floor(sparsity * total + 0.5))
    keep = torch.ones(total, dtype=torch.bool)
    if r > 0:
        t = torch.kthvalue(flat, r).values
        below = flat < t
        keep[below] = False
        ties = torch.nonzero(flat == t).flatten()[:r - int(below.sum())]
        keep[ties] = False
    out, start = [], 0
    for s in scores:
        out.append(keep[start:start + s.numel()].view_as(s))
        start += s.numel()
    return out


# ---- obd and obs: per-sample gradients ------------------------------------------


def per_sample_gradients(model, features, head, convs, images, labels, batch, normalise, rows):
    """Sums g^2 of every prunable weight over the images, in double, one
    backward per image; with rows set, also stores g into rows[l][i]."""
    w_head, b_head = head
    fisher = [torch.zeros(c.weight.numel(), dtype=torch.float64) for c in convs]
    for b0, x in batches(images, batch, normalise):
        for i in range(x.shape[0]):
            model.zero_grad(set_to_none=True)
            logits = features(x[i:i + 1]) @ w_head.T + b_head
            F.cross_entropy(logits, labels[b0 + i:b0 + i + 1]).backward()
            for l, c in enumerate(convs):
                g = c.weight.grad.reshape(-1)
                g64 = g.double()
                fisher[l].addcmul_(g64, g64)
                if rows is not None:
                    rows[l][b0 + i].copy_(g)
    model.zero_grad(set_to_none=True)
    return fisher


def damping_lambda(fisher, n, damping):
    total = sum(float(f.sum()) / n for f in fisher)
    count = sum(f.numel() for f in fisher)
    return damping * total / count


def obs_memory_bytes(counts, block, n):
    """topiary's estimate: gradients, scores and the block workspace."""
    b = min(block, max(counts))
    return sum(counts) * n * 4 + sum(counts) * 4 + (2 * b * b + 2 * b + n * b) * 8


def block_inverses(grads, start, stop, block, n, lam):
    """Inverse damped Fisher blocks of the columns [start, stop) of a layer's
    (n, count) gradients: (blocks, b, b) double, b = block (or the tail)."""
    g = grads[:, start:stop].double()
    b = block if stop - start >= block else stop - start
    g = g.reshape(n, -1, b).transpose(0, 1)  # (blocks, n, b)
    f = torch.bmm(g.transpose(1, 2), g) / n
    f.diagonal(dim1=1, dim2=2).add_(lam)
    return torch.cholesky_inverse(torch.linalg.cholesky(f))


def block_ranges(count, block, chunk=2048):
    """Column ranges of whole blocks, at most `chunk` blocks each, then the tail."""
    whole = count - count % block
    step = block * chunk
    for start in range(0, whole, step):
        yield start, min(start + step, whole)
    if whole < count:
        yield whole, count


def obs_saliency(w, grads, block, lam):
    n, count = grads.shape
    scores = torch.empty(count)
    flat = w.reshape(-1).double()
    for start, stop in block_ranges(count, block):
        inv = block_inverses(grads, start, stop, block, n, lam)
        diag = inv.diagonal(dim1=1, dim2=2).reshape(-1)
        scores[start:stop] = (flat[start:stop] ** 2 / (2.0 * diag)).float()
    return scores


def obs_update(w, keep, grads, block, lam):
    """OBS update of each block given its keep mask; pruned weights become 0.
    The solve on the pruned set P uses the principal block finv[P, P] with
    the identity on the kept rows and columns, so all blocks share one
    batched Cholesky."""
    n, count = grads.shape
    flat = w.reshape(-1)
    kept = keep.reshape(-1)
    for start, stop in block_ranges(count, block):
        pruned = ~kept[start:stop]
        b = block if stop - start >= block else stop - start
        pm = pruned.reshape(-1, b)
        active = pm.any(1)
        if not bool(active.any()):
            continue
        inv = block_inverses(grads, start, stop, block, n, lam)[active]
        pm = pm[active].double()
        wb = flat[start:stop].reshape(-1, b)[active].double()
        s = inv * pm.unsqueeze(2) * pm.unsqueeze(1)
        s = s + torch.diag_embed(1.0 - pm)
        z = torch.cholesky_solve((wb * pm).unsqueeze(2), torch.linalg.cholesky(s))
        new = wb - torch.bmm(inv, z).squeeze(2)
        new = new * (1.0 - pm)
        view = flat[start:stop].reshape(-1, b)
        view[active] = new.float()


# ---- layer_obs ------------------------------------------------------------------


def choose_rows(rows, total, seed):
    """Stratified rows, sel[k] = floor((k + u_k) total / rows), with u_k from
    the splitmix64 sequence that topiary uses."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) ^ golden
        h = z + golden * np.arange(1, rows + 1, dtype=np.uint64)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    u = np.zeros(rows) if rows == total else (h >> np.uint64(11)).astype(np.float64) / 2.0**53
    sel = ((np.arange(rows) + u) * total / rows).astype(np.int64)
    return np.minimum(sel, total - 1)


def gather_inputs(model, conv, images, rows_max, seed, batch):
    """Forward passes over all images (until the sampled rows are complete),
    gathering sampled im2col rows of conv's input: (groups, rows, cg)."""
    groups = conv.groups
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    dh, dw = conv.dilation
    out_hw = {}
    state = {"b0": 0, "k": 0}
    x_rows = None
    sel = None

    def hook(mod, inp):
        nonlocal x_rows, sel
        x = inp[0]
        if sel is None:
            h, w = x.shape[2], x.shape[3]
            p = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            q = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            out_hw["q"], out_hw["ppi"] = q, p * q
            total = len(images) * p * q
            rows = min(total, rows_max)
            sel = torch.from_numpy(choose_rows(rows, total, seed))
            cg = x.shape[1] // groups * kh * kw
            x_rows = torch.empty(groups, rows, cg)
        ppi, q, b0, k = out_hw["ppi"], out_hw["q"], state["b0"], state["k"]
        end = int(torch.searchsorted(sel, (b0 + x.shape[0]) * ppi))
        if end > k:
            s = sel[k:end]
            img = s // ppi - b0
            py, px = (s % ppi) // q, (s % ppi) % q
            xp = F.pad(x, (pw, pw, ph, ph))
            taps = [xp[img, :, py * sh + r * dh, px * sw + t * dw]
                    for r in range(kh) for t in range(kw)]
            patch = torch.stack(taps, 2)  # (k, C, R*S): channel, then r, then s
            patch = patch.reshape(end - k, groups, -1).transpose(0, 1)
            x_rows[:, k:end] = patch
            state["k"] = end

    handle = conv.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for b0 in range(0, len(images), batch):
                if sel is not None and state["k"] >= len(sel):
                    break
                state["b0"] = b0
                model(images[b0:b0 + batch])
    finally:
        handle.remove()
    return x_rows


def inverse_cholesky_upper(x, damping):
    """U with (H + lambda I)^-1 = U^T U, H = 2 X^T X / rows, per group.
    x: (G, rows, C) -> (G, C, C) double."""
    rows = x.shape[1]
    xd = x.double()
    h = torch.bmm(xd.transpose(1, 2), xd) * (2.0 / rows)
    mean_diag = h.diagonal(dim1=1, dim2=2).mean(1)
    lam = damping * torch.where(mean_diag > 0, mean_diag, torch.ones_like(mean_diag))
    h.diagonal(dim1=1, dim2=2).add_(lam.unsqueeze(1))
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def layer_obs_prune(w, zeros, u, block=128):
    """Prunes w (G, R, C) in double to `zeros` (G) zeros per group."""
    groups, rows, cols = w.shape
    keep = torch.ones_like(w, dtype=torch.bool)
    q = zeros.double() / (rows * cols)
    diag = u.diagonal(dim1=1, dim2=2)  # (G, C)
    for c0 in range(0, cols, block):
        b = min(block, cols - c0)
        before = torch.floor(q * rows * c0 + 0.5).long()
        after = torch.floor(q * rows * (c0 + b) + 0.5).long()
        score = (w[:, :, c0:c0 + b] / diag[:, None, c0:c0 + b]) ** 2
        order = torch.sort(score.reshape(groups, -1), dim=1, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(rows * b).expand(groups, -1).contiguous())
        keep[:, :, c0:c0 + b] = (rank >= (after - before).unsqueeze(1)).view(groups, rows, b)
        errs = torch.zeros(groups, rows, b, dtype=torch.float64)
        for j in range(c0, c0 + b):
            e = torch.where(keep[:, :, j], torch.zeros((), dtype=torch.float64),
                            w[:, :, j] / diag[:, j, None])
            errs[:, :, j - c0] = e
            w[:, :, j] = torch.where(keep[:, :, j], w[:, :, j], torch.zeros((), dtype=w.dtype))
            if j + 1 < c0 + b:
                w[:, :, j + 1:c0 + b] -= e.unsqueeze(2) * u[:, j, None, j + 1:c0 + b]
        if c0 + b < cols:
            w[:, :, c0 + b:] -= torch.bmm(errs, u[:, c0:c0 + b, c0 + b:])
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype))


def layer_obs(model, convs, alloc_keep, images, args):
    for l, conv in enumerate(convs):
        x = gather_inputs(model, conv, images, args.layer_obs_rows, args.seed + l, args.batch)
        groups = conv.groups
        k = conv.out_channels
        w = conv.weight.data.reshape(groups, k // groups, -1).double()
        zeros = (~alloc_keep[l]).reshape(groups, -1).sum(1)
        u = inverse_cholesky_upper(x, args.layer_obs_damping)
        pruned = layer_obs_prune(w, zeros, u)
        conv.weight.data.copy_(pruned.reshape_as(conv.weight).float())


# ---- batch-norm correction: match the dense statistics ---------------------------


def bn_measure(model, bns, images, batch, normalise):
    """Mean and population variance (double, per channel) of every BN input."""
    sums = [None] * len(bns)
    count = [0]

    def make_hook(i):
        def hook(mod, inp):
            # Per-plane sums in float32 (cascade summation), then double
            # across planes: a double reduction of the whole map is 20x slower.
            x = inp[0]
            s = x.sum(dim=(2, 3)).double().sum(0)
            sq = (x * x).sum(dim=(2, 3)).double().sum(0)
            m = x.shape[0] * x.shape[2] * x.shape[3]
            if sums[i] is None:
                sums[i] = [s, sq, m]
            else:
                sums[i][0] += s
                sums[i][1] += sq
                sums[i][2] += m
        return hook

    handles = [bn.register_forward_pre_hook(make_hook(i)) for i, bn in enumerate(bns)]
    try:
        with torch.no_grad():
            for _, x in batches(images, batch, normalise):
                model(x)
                count[0] += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    stats = []
    for s, sq, m in sums:
        mean = s / m
        stats.append((mean, torch.clamp(sq / m - mean * mean, min=0.0)))
    return stats


def bn_match(model, bns, dense, images, batch, normalise):
    saved = [(bn.running_mean.clone().double(), bn.running_var.clone().double()) for bn in bns]
    for n, bn in enumerate(bns):
        mu_p, var_p = bn_measure(model, bns, images, batch, normalise)[n]
        mu_d, var_d = dense[n]
        mean0, var0 = saved[n]
        s = torch.sqrt(var0 + bn.eps)
        ratio = torch.where(var_d > 1e-12, torch.sqrt(var_p / var_d), torch.ones_like(var_d))
        s_new = s * ratio.clamp(0.5, 2.0)
        bn.running_mean.copy_((mu_p - (mu_d - mean0) * s_new / s).float())
        bn.running_var.copy_(torch.clamp(s_new * s_new - bn.eps, min=0.0).float())


# ---- the job ----------------------------------------------------------------------


class Timer:
    def __init__(self):
        self.t = dict.fromkeys(TIMERS, 0.0)

    def stage(self, name):
        timer = self

        class Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.t[name] += time.perf_counter() - self.t0

        return Stage()


def run(args, timer):
    normalise = args.arch == "resnet50"
    with timer.stage("load"):
        model, features, convs = build(args.arch)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if args.method == "obs":
        # Checked before any data is read, as topiary does.
        counts = [c.weight.numel() for c in convs]
        need = obs_memory_bytes(counts, args.block_size, args.images)
        if need > args.obs_memory << 20:
            raise Rejected("block OBS needs %.1f MiB (%d samples x %d weights of gradients,"
                           " block %d) but the budget is %.1f MiB"
                           % (need / 1048576.0, args.images, sum(counts), args.block_size,
                              float(args.obs_memory)))
    needs_grads = args.method in ("obd", "obs")
    head = None
    with timer.stage("dense_features"):
        fm = os.path.join(args.data, "datasets", "fashion-mnist")
        train_x, train_y = read_idx(os.path.join(fm, "train-images-idx3-ubyte.gz"),
                                    os.path.join(fm, "train-labels-idx1-ubyte.gz"))
        calib = class_balanced(train_y, args.images, args.seed)
        calib_x, calib_y = train_x[calib], torch.from_numpy(train_y[calib])
        if needs_grads:
            fit = class_balanced(train_y, args.fit_images, args.seed + 1)
            head = ridge_head(pooled(features, train_x[fit], args.batch, normalise),
                              torch.from_numpy(train_y[fit]))
        # A small evaluation task, as topiary's CLI needs one.
        test_x, test_y = read_idx(os.path.join(fm, "t10k-images-idx3-ubyte.gz"),
                                  os.path.join(fm, "t10k-labels-idx1-ubyte.gz"))
        ev = class_balanced(test_y, 2 * args.eval_images, args.seed)
        eval_fit, eval_x = test_x[ev[:args.eval_images]], test_x[ev[args.eval_images:]]
        ridge_head(pooled(features, eval_fit, args.batch, normalise),
                   torch.from_numpy(test_y[ev[:args.eval_images]]))
        pooled(features, eval_x, args.batch, normalise)
    dense_bn = None
    if args.bn_correction == "match-dense":
        with timer.stage("bn_recalibration"):
            dense_bn = bn_measure(model, bns, calib_x, args.batch, normalise)

    weights = [c.weight.data for c in convs]
    rows = None
    with timer.stage("saliency"):
        if args.method == "obs":
            rows = [torch.empty(args.images, w.numel()) for w in weights]
        if needs_grads:
            fisher = per_sample_gradients(model, features, head, convs, calib_x, calib_y,
                                          args.batch, normalise, rows)
            lam = damping_lambda(fisher, args.images, args.damping)
            if args.method == "obd":
                scores = [(0.5 * w.reshape(-1).double() ** 2 * (f / args.images + lam)).float()
                          for w, f in zip(weights, fisher)]
            else:
                scores = [obs_saliency(w, g, args.block_size, lam)
                          for w, g in zip(weights, rows)]
            del fisher
        elif args.method == "layer_obs":
            alloc_keep = global_masks([w.abs() for w in weights], args.sparsity)
    with timer.stage("mask"):
        if args.method == "magnitude":
            scores = [w.abs().reshape(-1) for w in weights]
        if args.method != "layer_obs":
            keep = global_masks(scores, args.sparsity)
    with timer.stage("update"):
        if args.method == "obs":
            for w, k, g in zip(weights, keep, rows):
                obs_update(w, k, g, args.block_size, lam)
            rows = None
        elif args.method == "layer_obs":
            images = torch.cat([x for _, x in batches(calib_x, args.batch, normalise)])
            layer_obs(model, convs, alloc_keep, images, args)
            del images
    with timer.stage("mask"):
        if args.method != "layer_obs":
            for w, k in zip(weights, keep):
                w.mul_(k.reshape(w.shape))
    if dense_bn is not None:
        with timer.stage("bn_recalibration"):
            bn_match(model, bns, dense_bn, calib_x, args.batch, normalise)
    with timer.stage("pruned_eval"):
        pooled(features, eval_x, args.batch, normalise)
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    return total, zeros / total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=["mobilenet_v2", "resnet50"])
    parser.add_argument("--method", required=True,
                        choices=["magnitude", "obd", "obs", "layer_obs"])
    parser.add_argument("--data", required=True, help="folder with datasets/fashion-mnist/")
    parser.add_argument("--images", type=int, default=64, help="calibration images")
    parser.add_argument("--fit-images", type=int, default=200,
                        help="images for the head of obd and obs")
    parser.add_argument("--eval-images", type=int, default=10,
                        help="head-fit and evaluation images of the small evaluation task")
    parser.add_argument("--bn-correction", default="match-dense",
                        choices=["match-dense", "none"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--damping", type=float, default=1e-3,
                        help="obd and obs: lambda = damping * mean Fisher")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--obs-memory", type=int, default=4096, help="MiB")
    parser.add_argument("--layer-obs-rows", type=int, default=4096)
    parser.add_argument("--layer-obs-damping", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(2)
    timer = Timer()
    result = {"impl": "pytorch", "arch": args.arch, "method": args.method,
              "images": args.images, "bn_correction": args.bn_correction}
    t0 = time.perf_counter()
    try:
        with torch.no_grad() if args.method not in ("obd", "obs") else torch.enable_grad():
            total, sparsity = run(args, timer)
        result.update(status="ok", prunable_weights=total, sparsity_achieved=round(sparsity, 6))
    except Rejected as e:
        result.update(status="rejected", message=str(e))
    timer.t["total"] = time.perf_counter() - t0
    result["timings_s"] = {k: round(v, 3) for k, v in timer.t.items()}
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    result["torch"] = torch.__version__
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
