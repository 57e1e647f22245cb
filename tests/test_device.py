"""Where training runs (`--device`, `--dtype`), and the memory options that must not change the step:
gradient accumulation and gradient checkpointing. The CUDA side of these lives in test_gpu.py."""

import numpy as np
import pytest
import torch

from runtime.errors import ConfigError
from runtime.prompt import HistoryEntry, ItemText, PromptTemplate
from training.device import cuda_reason, resolve_compute
from training.groups import pack_steps, single_groups
from training.joint import JointConfig, run_stage
from training.llm import LLMScorer, LoRAConfig, resolve_base_llm
from training.pipeline import preset_config

from .tiny_llm import write_tiny_llama_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")


def test_auto_takes_the_device_torch_sees_and_cuda_is_refused_with_the_reason_where_there_is_none():
    cpu = resolve_compute("cpu")
    assert cpu.device.type == "cpu" and cpu.llm_dtype == torch.float32 and cpu.to_dict()["llm_dtype"] == "float32"
    assert resolve_compute("cpu", "bfloat16").llm_dtype == torch.bfloat16
    auto = resolve_compute("auto")
    reason = cuda_reason()
    if reason is None:  # a CUDA box: auto takes the card, and the LLM trains in bfloat16 where it can
        assert auto.is_cuda and resolve_compute("cuda").device.type == "cuda"
        with pytest.raises(ConfigError, match="CUDA device"):
            resolve_compute(f"cuda:{torch.cuda.device_count()}")
    else:
        assert auto.device.type == "cpu" and auto.llm_dtype == torch.float32
        with pytest.raises(ConfigError, match="--device cpu") as refused:
            resolve_compute("cuda")
        assert reason in str(refused.value)
    for device, dtype in (("tpu", "auto"), ("cpu:0", "auto"), ("cpu", "int8")):
        with pytest.raises(ConfigError, match="unknown"):
            resolve_compute(device, dtype)


def test_the_device_preset_sits_between_the_preset_and_the_users_options():
    config = preset_config("default", {"device": "cpu"})
    assert config.joint.batch_size == 16 and config.score_batch_size == 8  # the CPU: one group of 16 a step
    assert preset_config("default", {"device": "cpu", "joint": {"batch_size": 6}}).joint.batch_size == 6
    if cuda_reason() is None:
        cuda = preset_config("quick", {"device": "cuda", "joint": {"llm_learning_rate": 1e-4}})
        assert cuda.joint.batch_size == 64 and cuda.score_batch_size == 64
        assert cuda.joint.llm_learning_rate == 1e-4 and cuda.joint.stage2_samples == 128


def _adapters_after_two_steps(tiny_gguf, tmp_path, name: str, **joint) -> tuple[dict, list, int]:
    """The adapters and losses after two steps of 4 prompts, and how often block 0's attention ran forward."""
    torch.manual_seed(0)  # the same LoRA initialisation in every call
    # prompt version 4's text: with version 5's, one adapter entry of this random tiny model ends
    # 3.6e-4 apart between the two summation orders while the losses agree to 1e-6 (likely a gradient
    # near Adam's epsilon, whose first step divides a gradient by its own size); the prompt is not
    # what is tested here, the accumulation is
    template = PromptTemplate(version=4)
    scorer = LLMScorer.load(resolve_base_llm(str(tiny_gguf)), template, LoRAConfig(dropout=0.0),
                            gradient_checkpointing=joint.pop("gradient_checkpointing", False))  # fmt: skip
    calls = []
    scorer._causal_lm().get_decoder().layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    titles = [f"Movie Number {i}" for i in range(1, 9)]
    parts = {
        i: scorer.template.ids(scorer.tokenize, scorer.bos_id, [HistoryEntry(ItemText(titles[(i + k) % 8]),
                               1.0 + (i + k) % 5) for k in range(i % 4)], [ItemText(titles[i])])
        for i in range(8)
    }  # fmt: skip
    labels = np.array([1, 0, 1, 1, 0, 0, 1, 0], dtype=np.int8)
    # every prompt whole (one decoder pass per micro-batch); the shared-prefix path has its own test
    config = JointConfig(batch_size=4, llm_learning_rate=1e-2, shared_prefix=False, **joint)
    result = run_stage("llm", tmp_path / name, pack_steps(single_groups(range(8)), 4), labels, None,
                       lambda g: parts[g.anchor], scorer, None, None, (), config, show_progress=False)  # fmt: skip
    return scorer.trainable_state(), result.losses, len(calls)


def test_gradient_accumulation_and_checkpointing_take_the_same_step(tiny_gguf, tmp_path):
    whole, whole_losses, whole_calls = _adapters_after_two_steps(tiny_gguf, tmp_path, "whole")
    split, split_losses, split_calls = _adapters_after_two_steps(tiny_gguf, tmp_path, "split", grad_accumulation=3)
    recomputed, _, recomputed_calls = _adapters_after_two_steps(tiny_gguf, tmp_path, "recomputed",
                                                                gradient_checkpointing=True)  # fmt: skip
    assert len(whole_losses) == len(split_losses) == 2
    # one forward pass per micro-batch; with checkpointing each block runs again in the backward pass
    assert (whole_calls, split_calls, recomputed_calls) == (2, 6, 4)
    # 4 prompts a step in micro-batches of 2, 1 and 1: the loss of the step is still the mean over 4
    for a, b in zip(whole_losses, split_losses, strict=True):
        assert a["llm"] == pytest.approx(b["llm"], abs=1e-5)
    moved = 0.0
    for name, value in whole.items():
        # a float32 sum in another order: equal to ~1e-6 of an Adam step of 1e-2
        assert torch.allclose(value, split[name], atol=1e-5), name
        assert torch.allclose(value, recomputed[name], atol=1e-5), name
        moved = max(moved, float(value.abs().max()))
    assert moved > 1e-3  # the adapters did train
