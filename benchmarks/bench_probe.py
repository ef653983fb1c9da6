"""Online-probe overhead: the engine's training step with the monitor's online linear probe against the
same step without it (issue target: under 2% of a ResNet-50 step).

The step is ``bench_step``'s (ResNet + 3 x 8192 projector, SGD, the INTL objective). With the probe, the
backbone's output of the first view is captured by a forward hook (as the engine does) and
``pretrain.monitor.OnlineProbe.step`` trains BN + linear on it (1000 classes, as on ImageNet). Also the
probe's step alone, for scale (robust to the noise of the full steps on a shared machine), and the plain
step timed a second time, interleaved with the others: its ratio to the first is the noise floor.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import Row, interleaved
from pretrain.methods import build_method
from pretrain.model import SSLNetwork
from pretrain.monitor import OnlineProbe
from pretrain.optim import build_optimizer

NAME = "probe"


def run(quick: bool = False, warmup: int = 1, repeats: int = 5, arch: str = "resnet50", image: int = 64,
        batch: int = 16, projector: int = 8192, classes: int = 1000, log=print) -> list[Row]:
    if quick:
        arch, image, batch, projector, classes = "resnet18", 32, 8, 64, 10
    torch.manual_seed(0)
    net = SSLNetwork(arch, [projector] * 3)
    net.train()
    opt = build_optimizer(net, lr=1e-3, momentum=0.9, weight_decay=1e-5)
    objective = build_method({"name": "intl"}, global_batch=batch)
    probe = OnlineProbe(net.backbone.feature_dim, classes, lr=0.1, device=torch.device("cpu"))
    views = [torch.randn(batch, 3, image, image) for _ in range(2)]
    labels = torch.randint(0, classes, (batch,))
    captured: dict = {}

    def hook(module, inputs, output):
        if captured.get("on"):
            captured.update(on=False, features=output.detach())

    net.backbone.register_forward_hook(hook)

    def step(with_probe: bool):
        def run_step():
            captured["on"] = with_probe
            opt.zero_grad(set_to_none=True)
            objective(net(views))["loss"].backward()
            opt.step()
            if with_probe:
                probe.step(captured["features"], labels)
        return run_step

    features = torch.randn(batch, net.backbone.feature_dim)

    def probe_alone():
        probe.step(features, labels)

    case = f"{arch} {image}px batch {batch} x 2 views, projector 3x{projector}, probe {classes} classes"
    # The same step twice: how much two identical variants differ here (the noise floor of the comparison).
    fns = {"INTL step": step(False), "INTL step + online probe": step(True),
           "INTL step (again: noise floor)": step(False)}
    times = interleaved(fns, warmup, repeats, progress=lambda m: log(f"[probe] {case}: {m}"))
    alone = interleaved({"probe step alone": probe_alone}, warmup, max(repeats, 20))["probe step alone"]
    rows = [Row(NAME, case, name, "ms/step", [1000 * t for t in ts], baseline=None if k == 0 else "INTL step")
            for k, (name, ts) in enumerate(times.items())]
    rows.append(Row(NAME, case, "probe step alone", "ms", [1000 * t for t in alone], baseline=None))
    base = statistics.median(times["INTL step"])
    rows[1].extra.update(overhead_pct_steps=round(100 * (statistics.median(times["INTL step + online probe"]) - base)
                                                  / base, 2),
                         overhead_pct_probe_alone=round(100 * statistics.median(alone) / base, 2))
    noise = round(100 * (statistics.median(times["INTL step (again: noise floor)"]) - base) / base, 2)
    rows[1].extra["noise_floor_pct"] = noise
    log(f"[probe] online-probe overhead: {rows[1].extra['overhead_pct_probe_alone']}% of the step (probe alone), "
        f"{rows[1].extra['overhead_pct_steps']}% (full steps; the same step twice differs by {noise}%)")
    return rows
