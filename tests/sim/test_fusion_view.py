"""One view of fusion: the sim's supergroups, AdaRound's reconstruction chains and the emulation's fused groups
all read `ModelGraph.fused_after` / `ModelGraph.supergroup_members`, so they agree op for op."""

import torch
import torch.nn.functional as F
from torch import nn

import edgequant as eq
from edgequant.ptq.adaround import _activation_chains


class Patterns(nn.Module):
    """Conv→BN→ReLU, Conv→Dropout→ReLU6, Add→ReLU (functional), Linear→ReLU, and a Linear with nothing after."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.drop, self.relu6 = nn.Conv2d(3, 8, 3, padding=1), nn.Dropout(), nn.ReLU6()
        self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(self.conv1(x)))
        b = self.relu6(self.drop(self.conv2(x)))
        pooled = F.relu(a + b).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(pooled)))


FUSED = {"conv1": ["bn1", "relu1"], "bn1": ["relu1"], "conv2": ["relu6"], "add": ["relu"], "fc1": ["relu_1"]}
"""What a runtime computes in each op's kernel (pass-through modules such as Dropout are not ops)."""


def test_the_sim_adaround_and_the_emulation_fuse_the_same_ops():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    sim = eq.QuantSim(Patterns().eval(), x)
    graph = sim.graph()
    fused = {n.name: [f.name for f in graph.fused_after(n)] for n in graph.module_nodes() if n.name != "drop"}
    assert {name: chain for name, chain in fused.items() if chain} == FUSED

    # the sim: no output quantizer on an op with something fused after it, one on the op that ends the group
    fused_in_sim = {e.tensor for e in sim.coverage() if e.reason.startswith("fused with the next op")}
    assert fused_in_sim == set(FUSED)
    for chain in FUSED.values():
        assert "0" in sim.model.get_submodule(chain[-1]).output_quantizers

    # AdaRound reconstructs each layer's output after the ops fused after it
    chains = _activation_chains(sim)
    for layer in ("conv1", "conv2", "fc1"):
        assert [m for m, _, _ in chains[layer]] == [sim.model.get_submodule(n) for n in FUSED[layer]]
    assert "fc2" not in chains

    # the emulation computes an op and its fused activation in one kernel, written by the activation's quantizer;
    # an unfolded BatchNorm in between is not one integer kernel
    sim.calibrate([x], progress=False)
    plan = sim.emulate("onnxruntime")
    emulated = {op.name: op for op in plan.ops}
    assert set(emulated) == {"conv2", "add", "fc1", "fc2"} and "conv1" in plan.skipped
    for name in ("conv2", "add", "fc1"):
        activation = sim.model.get_submodule(FUSED[name][-1])
        assert emulated[name].activation is activation
        assert emulated[name].output is activation.output_quantizers["0"]
    assert emulated["fc2"].activation is None


def test_supergroups_follow_the_config_beyond_the_fixed_activation_chain():
    """A config's supergroup may fuse ops no runtime kernel fuses by default (HTP's Conv→HardSwish)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardswish(), nn.Conv2d(4, 4, 3), nn.ReLU()).eval()
    sim = eq.QuantSim(model, torch.randn(1, 3, 8, 8), config="htp")
    graph = sim.graph()
    assert graph.supergroup_members(sim.config.supergroups) == {"0": "Conv+HardSwish", "2": "Conv+Relu"}
    assert graph.supergroup_members([]) == {}
    assert [n.name for n in graph.fused_after(graph.module_nodes()[0])] == []
    assert [n.name for n in graph.fused_after(graph.module_nodes()[2])] == ["3"]
    assert "0" not in sim.model.get_submodule("0").output_quantizers
