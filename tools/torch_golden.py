#!/usr/bin/python3
"""Generate PyTorch golden fixtures for the ResNet and ViT importers.

For each model this writes two safetensors files into the output directory
(default build/golden/torch):

  <model>.safetensors         the weights under their PyTorch names
  <model>.golden.safetensors  input (N, 3, H, W), labels (N), logits or
                              features, the mean cross-entropy loss against
                              the labels (eval mode), and grad.input and
                              grad.<param> for the listed parameters

Models: torchvision resnet18 and resnet50 with random weights and randomised
batch-norm statistics. A small torchvision VisionTransformer (image 32,
patch 8, 2 layers, 2 heads, hidden 32, MLP 64, 10 classes) is saved three
times: under torchvision 0.14 names, under the older mlp.linear_1/linear_2
names and under timm names. The same ViT without its head, under timm names,
stands for a DINO backbone, whose output is the class-token feature.

The safetensors format is written by hand (8-byte little-endian header
length, JSON header padded with spaces to a multiple of 8, raw data) because
the safetensors package is not installed here. Needs torch and torchvision
(tested with torch 1.13 and torchvision 0.14). Everything is seeded, so a rerun
writes the same files.

Usage: torch_golden.py [OUTPUT_DIR]
"""
import json
import os
import struct
import sys

import torch
import torch.nn.functional as F
import torchvision

DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}

BATCH = 2
TORCHVISION_PARAM_COUNTS = {"resnet18": 11689512, "resnet50": 25557032}


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} to path (through a temporary file and a rename)."""
    header = {}
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        data = t.numpy().tobytes()
        header[name] = {
            "dtype": DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data)
    os.replace(tmp, path)


def calibrate_batchnorm(model, image_size):
    """Set running statistics from random batches, then perturb them and the
    affine parameters so that they all influence the eval-mode output."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, image_size, image_size))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.add_(0.1 * torch.randn(c))
                m.running_var.mul_(torch.empty(c).uniform_(0.7, 1.4))
                m.weight.copy_(torch.empty(c).uniform_(0.6, 1.4))
                m.bias.copy_(0.1 * torch.randn(c))
                m.num_batches_tracked.fill_(1000)
    model.eval()


def randomize_vit(model):
    """Replace torchvision's initialisation (zero head, zero class token) with
    random values that keep the activations of order one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "encoder.ln.weight":
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.dim() >= 2 and name not in ("class_token", "encoder.pos_embedding"):
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in**0.5)
            else:
                p.copy_(0.3 * torch.randn_like(p))
    model.eval()


def golden_tensors(model, forward, x, labels, grad_names):
    """Run forward and backward of the mean cross-entropy and collect the
    outputs and the gradients of the named parameters and of the input."""
    params = dict(model.named_parameters())
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    out = forward(x)
    loss = F.cross_entropy(out, labels)
    loss.backward()
    golden = {
        "input": x.detach(),
        "labels": labels,
        "output": out.detach(),
        "loss": loss.detach().reshape(1),
        "grad.input": x.grad,
    }
    for name, saved in grad_names.items():
        golden["grad." + saved] = params[name].grad
    return golden


def save_model(out_dir, name, state, golden, metadata):
    write_safetensors(os.path.join(out_dir, name + ".safetensors"), state, metadata)
    write_safetensors(os.path.join(out_dir, name + ".golden.safetensors"), golden, metadata)
    print(f"{name}: {len(state)} tensors, output {tuple(golden['output'].shape)}, "
          f"loss {golden['loss'].item():.6f}")


def make_resnet(out_dir, arch, grad_names):
    torch.manual_seed(1 if arch == "resnet18" else 2)
    model = getattr(torchvision.models, arch)(weights=None)
    calibrate_batchnorm(model, 224)
    count = sum(p.numel() for p in model.parameters())
    if count != TORCHVISION_PARAM_COUNTS[arch]:
        raise SystemExit(f"{arch}: {count} parameters, torchvision documents "
                         f"{TORCHVISION_PARAM_COUNTS[arch]}")
    x = torch.randn(BATCH, 3, 224, 224)
    # Random deep ResNets have large logits that saturate the softmax; scale
    # the classifier so that the logits have a standard deviation of 2.
    with torch.no_grad():
        model.fc.weight.mul_(2.0 / model(x).std())
    labels = torch.tensor([3, 917])
    golden = golden_tensors(model, model, x, labels, {n: n for n in grad_names})
    meta = {"architecture": arch, "num_parameters": count}
    save_model(out_dir, arch, model.state_dict(), golden, meta)


TIMM_RENAMES = [
    ("encoder.layers.encoder_layer_", "blocks."),
    ("conv_proj.", "patch_embed.proj."),
    ("class_token", "cls_token"),
    ("encoder.pos_embedding", "pos_embed"),
    ("ln_1.", "norm1."),
    ("ln_2.", "norm2."),
    ("self_attention.in_proj_weight", "attn.qkv.weight"),
    ("self_attention.in_proj_bias", "attn.qkv.bias"),
    ("self_attention.out_proj.", "attn.proj."),
    ("mlp.0.", "mlp.fc1."),
    ("mlp.3.", "mlp.fc2."),
    ("encoder.ln.", "norm."),
    ("heads.head.", "head."),
]


def rename(name, renames):
    for old, new in renames:
        name = name.replace(old, new)
    return name


def vit_features(model, x):
    """Class-token feature before the head, as torchvision's forward computes it."""
    x = model._process_input(x)
    cls = model.class_token.expand(x.shape[0], -1, -1)
    return model.encoder(torch.cat([cls, x], dim=1))[:, 0]


def make_vits(out_dir):
    torch.manual_seed(3)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
        mlp_dim=64, num_classes=10)
    randomize_vit(model)
    count = sum(p.numel() for p in model.parameters())
    x = torch.randn(BATCH, 3, 32, 32)
    state = model.state_dict()
    all_params = [n for n, _ in model.named_parameters()]
    meta = {"num_heads": 2, "num_parameters": count}

    schemes = {
        "vit_torchvision": [],
        "vit_torchvision_linear": [("mlp.0.", "mlp.linear_1."), ("mlp.3.", "mlp.linear_2.")],
        "vit_timm": TIMM_RENAMES,
    }
    labels = torch.tensor([1, 8])
    for name, renames in schemes.items():
        grads = {n: rename(n, renames) for n in all_params}
        golden = golden_tensors(model, model, x, labels, grads)
        renamed = {rename(k, renames): v for k, v in state.items()}
        save_model(out_dir, name, renamed, golden, dict(meta, architecture=name))

    # A DINO-style backbone: timm names, no head, the output is the feature.
    body = [n for n in all_params if not n.startswith("heads.")]
    grads = {n: rename(n, TIMM_RENAMES) for n in body}
    labels = torch.tensor([5, 30])
    golden = golden_tensors(model, lambda t: vit_features(model, t), x, labels, grads)
    renamed = {rename(k, TIMM_RENAMES): v for k, v in state.items() if not k.startswith("heads.")}
    count = sum(model.get_parameter(n).numel() for n in body)
    save_model(out_dir, "vit_dino", renamed, golden,
               dict(meta, architecture="vit_dino", num_parameters=count))


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "build/golden/torch"
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    make_resnet(out_dir, "resnet18", ["conv1.weight", "bn1.weight", "bn1.bias",
                                      "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                                      "layer4.1.bn2.weight", "fc.weight", "fc.bias"])
    make_resnet(out_dir, "resnet50", ["conv1.weight", "layer1.0.conv1.weight",
                                      "layer1.0.conv3.weight", "layer2.0.conv2.weight",
                                      "layer3.5.bn3.bias", "layer4.0.downsample.0.weight",
                                      "layer4.2.bn3.weight", "fc.weight"])
    make_vits(out_dir)


if __name__ == "__main__":
    main()
