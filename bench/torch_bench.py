#!/usr/bin/python3
"""PyTorch side of the model benchmarks, and the random-weight checkpoints
that topiary's side loads.

usage:
  torch_bench.py run --arch ARCH [--size PX] [--batch N] [--iters I] [--backward]
  torch_bench.py export --arch ARCH --out FILE.safetensors

ARCH is mobilenet_v2, resnet50 or vit_b_16 (torchvision definitions, random
weights, eval mode). `run` prints one JSON line in the format of bench_model.c
(cpu_s: the least process CPU time of one timed iteration).
Threads: torch.set_num_threads(os.cpu_count()), the same cores topiary uses.
"""
import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from torch_golden import write_safetensors  # noqa: E402


def build(arch, size):
    torch.manual_seed(0)
    if arch == "vit_b_16":
        return torchvision.models.vit_b_16(image_size=size or 224)
    return getattr(torchvision.models, arch)()


def run(args):
    torch.set_num_threads(os.cpu_count())
    model = build(args.arch, args.size).eval()
    size = args.size or 224
    x = torch.rand(args.batch, 3, size, size)
    labels = torch.zeros(args.batch, dtype=torch.long)
    best = best_cpu = float("inf")
    for it in range(args.iters + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        if args.backward:
            model.zero_grad(set_to_none=False)
            loss = F.cross_entropy(model(x), labels)
            loss.backward()
        else:
            with torch.no_grad():
                model(x)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if it > 0:
            best, best_cpu = min(best, dt), min(best_cpu, dc)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"bench": "model", "impl": "pytorch", "arch": args.arch, "size": size,
                      "batch": args.batch, "backward": int(args.backward),
                      "images_per_s": round(args.batch / best, 3), "cpu_s": round(best_cpu, 3),
                      "peak_rss_mib": round(peak), "torch": torch.__version__,
                      "threads": torch.get_num_threads()}, separators=(",", ":")))


def export(args):
    model = build(args.arch, 0).eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"num_heads": "12"} if args.arch == "vit_b_16" else None
    write_safetensors(args.out, state, metadata)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "export"])
    parser.add_argument("--arch", required=True, choices=["mobilenet_v2", "resnet50", "vit_b_16"])
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        if not args.out:
            parser.error("export needs --out")
        export(args)


if __name__ == "__main__":
    main()
