"""Shared-prefix training and scoring: a user's prefix runs once and the candidates' suffixes against
its cache. It must give what every prompt run whole gives (answers, hidden states, LoRA gradients),
on the tiny LLaMA and on a small random Gemma 3 (sliding-window layers, logit soft-capping); and the
groups it trains on must be leak-free."""

import numpy as np
import pytest
import torch

from runtime.prompt import HistoryEntry, ItemText, PromptTemplate
from training.data import build_samples
from training.data.registry import load_dataset
from training.groups import (
    GroupPrompts,
    PrefixGroup,
    group_rows,
    pack_steps,
    snapshot_groups,
    take_samples,
    uncertain_rows,
    user_groups,
)
from training.joint import AlignmentHeads, llm_forward
from training.llm import LLMScorer, LoRAConfig, resolve_base_llm
from training.pipeline import same_history_groups, score_groups, score_llm

from .tiny_llm import write_tiny_llama_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")


def _randomize_adapters(scorer: LLMScorer) -> None:
    """LoRA's B starts at zero (so A gets no gradient): give both values, so both are compared."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in scorer.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _groups(scorer: LLMScorer) -> list[tuple[list[int], list[list[int]]]]:
    titles = [f"Movie Number {i}" for i in range(1, 12)]
    out = []
    for user, count in ((0, 5), (1, 3), (2, 1)):
        history = [HistoryEntry(ItemText(titles[(user + k) % 11], tags=("Drama",)), 1.0 + k % 5)
                   for k in range(user * 3)]  # fmt: skip
        targets = [ItemText(titles[(user * 4 + k) % 11], tags=("Comedy", "Action")[: 1 + k % 2]) for k in range(count)]
        out.append(scorer.template.ids(scorer.tokenize, scorer.bos_id, history, targets))
    return out


def _loss_and_gradients(scorer, groups, shared: bool, heads: AlignmentHeads | None, blocks=(1, 3), rows=None):
    scorer.zero_grad(set_to_none=True)
    if heads is not None:
        heads.zero_grad(set_to_none=True)
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0])[: sum(len(s) for _, s in groups)]
    logit, hidden = llm_forward(scorer, groups, shared, blocks if heads is not None else (), rows)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, labels)
    if heads is not None:
        crm_layers = [torch.linspace(-1, 1, len(labels) * 6).reshape(len(labels), 6) * (j + 1) for j in range(2)]
        loss = loss + 0.1 * heads(crm_layers, hidden)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in scorer.named_parameters() if p.requires_grad}
    return logit.detach(), [h.detach() for h in hidden], loss.item(), grads


def _assert_same_path(scorer: LLMScorer, groups, rows=None) -> None:
    _randomize_adapters(scorer)
    scorer.train()  # LoRA dropout is 0 here: train mode must not change the answers
    for with_alignment in (False, True):
        torch.manual_seed(3)
        heads = AlignmentHeads(6, scorer.hidden_size, 2, 8) if with_alignment else None
        whole = _loss_and_gradients(scorer, groups, False, heads, rows=rows)
        shared = _loss_and_gradients(scorer, groups, True, heads, rows=rows)
        assert torch.allclose(whole[0], shared[0], atol=1e-4), (whole[0], shared[0])
        for a, b in zip(whole[1], shared[1], strict=True):  # hidden states at each candidate's last token
            assert torch.allclose(a, b, atol=1e-4 * max(1.0, float(a.abs().max())))
        assert whole[2] == pytest.approx(shared[2], abs=1e-5)
        largest = max(float(g.abs().max()) for g in whole[3].values())
        assert largest > 1e-4  # the adapters do get a gradient
        for name, g in whole[3].items():
            assert torch.allclose(g, shared[3][name], atol=1e-4 * largest), name
        projector = [g for name, g in whole[3].items() if "crm_projector" in name]
        assert bool(projector) == (rows is not None)
        assert all(float(g.abs().max()) > 0 for g in projector)  # the CRM token is trained too


def test_shared_prefix_gives_the_answers_and_gradients_of_whole_prompts(tiny_gguf):
    torch.manual_seed(0)
    scorer = LLMScorer.load(resolve_base_llm(str(tiny_gguf)), PromptTemplate(), LoRAConfig(dropout=0.0))
    groups = _groups(scorer)
    assert [len(s) for _, s in groups] == [5, 3, 1] and len({len(p) for p, _ in groups}) == 3
    _assert_same_path(scorer, groups)


def _tiny_gemma3(tiny_gguf, sliding_window: int) -> LLMScorer:
    """A small random Gemma 3 (the default LLM's architecture: sliding-window and global layers, soft-capped
    logits) with the tiny GGUF's tokenizer, wrapped as training wraps the real one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=sliding_window,
                              layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                           "full_attention"], final_logit_softcapping=30.0, pad_token_id=3,
                              bos_token_id=1, eos_token_id=2, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))  # fmt: skip
    return LLMScorer(model, tokenizer, resolve_base_llm(str(tiny_gguf)), PromptTemplate())


def test_shared_prefix_on_gemma3_layers_within_and_beyond_the_sliding_window(tiny_gguf):
    # within the window (Gemma 3 270M: 512 tokens; these prompts ~100): the mask is the plain causal one
    scorer = _tiny_gemma3(tiny_gguf, sliding_window=512)
    groups = _groups(scorer)
    assert max(len(p) + max(map(len, s)) for p, s in groups) < 512
    _assert_same_path(scorer, groups)
    # a window shorter than the prompts: the group falls back to whole prompts, still the same answers
    narrow = _tiny_gemma3(tiny_gguf, sliding_window=16)
    with torch.no_grad():
        whole, _ = llm_forward(narrow, groups, False)
        shared, _ = llm_forward(narrow, groups, True)
    assert torch.allclose(whole, shared, atol=1e-4)


def _assert_crm_token_path(scorer: LLMScorer, groups) -> None:
    """The CRM token: zero at first (the text-only answers), then the same answers and gradients shared or
    whole; each candidate reads its own row's vector; without rows the forward refuses."""
    from runtime.errors import ConfigError

    rows = np.arange(sum(len(s) for _, s in groups))
    table = torch.randn(len(rows), 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain, _ = llm_forward(scorer, groups, True)
        scorer.enable_crm_token(6, lambda r: table[torch.as_tensor(r)])
        first, _ = llm_forward(scorer, groups, True, rows=rows)
    assert torch.allclose(plain, first, atol=1e-5)
    _assert_same_path(scorer, groups, rows)
    with torch.no_grad():
        read, _ = llm_forward(scorer, groups, True, rows=rows)
        swapped, _ = llm_forward(scorer, groups, True, rows=rows[::-1].copy())
    assert not torch.allclose(read, swapped, atol=1e-4)
    with pytest.raises(ConfigError, match="rows"):
        llm_forward(scorer, groups, True)


def test_crm_token_keeps_shared_prefix_equal_to_whole_prompts(tiny_gguf):
    torch.manual_seed(0)
    scorer = LLMScorer.load(resolve_base_llm(str(tiny_gguf)), PromptTemplate(), LoRAConfig(dropout=0.0))
    _assert_crm_token_path(scorer, _groups(scorer))
    # Gemma 3 scales its input embeddings inside the embedding module: the token is added after that
    gemma = _tiny_gemma3(tiny_gguf, sliding_window=512)
    _assert_crm_token_path(gemma, _groups(gemma))


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from .conftest import write_synthetic_recbole

    folder = write_synthetic_recbole(tmp_path_factory.mktemp("data") / "synthetic", users=40, items=30, per_user=20)
    return build_samples(load_dataset("movielens-100k", folder), history_length=5)


def test_training_groups_are_a_users_next_interactions_after_the_cut(samples):
    train = samples.indices("train")
    groups = user_groups(samples, train, 4, np.random.default_rng(0))
    rows = group_rows(groups)
    assert sorted(rows.tolist()) == train.tolist()  # every training sample once
    for group in groups:
        assert group.anchor == group.rows[0] and 1 <= len(group) <= 4
        assert len({samples.user[r] for r in group.rows}) == 1
        times = samples.timestamp[list(group.rows)]
        assert (np.diff(times) >= 0).all()
        # the prefix is the anchor's history: strictly earlier than every candidate (no leak)
        history = [h for h in samples.history[group.anchor] if h >= 0]
        assert all(samples.timestamp[h] < times.min() for h in history)
        # the candidates are consecutive: no interaction of the user lies between them
        user_train = [r for r in train if samples.user[r] == samples.user[group.anchor]]
        start = user_train.index(group.anchor)
        assert list(group.rows) == user_train[start : start + len(group)]
    other = user_groups(samples, train, 4, np.random.default_rng(1))
    assert [g.rows for g in other] != [g.rows for g in groups]  # seeds move the cuts and the order

    taken, rest = take_samples(groups, 25)
    assert len(group_rows(taken)) == 25 and not set(group_rows(taken)) & set(group_rows(rest))
    assert len(group_rows(taken)) + len(group_rows(rest)) == len(train)
    steps = pack_steps(taken, 8)
    assert all(sum(map(len, s)) >= 8 for s in steps[:-1]) and sum(len(g) for s in steps for g in s) == 25


def test_uncertain_rows_are_the_most_uncertain_share_grouped_leak_free(samples):
    train = samples.indices("train")
    entropy = np.random.default_rng(3).random(len(samples))
    kept = uncertain_rows(train, entropy, needed=10, share=0.2)
    assert len(kept) == int(np.ceil(0.2 * len(train))) and set(kept) <= set(train)
    assert entropy[kept].min() >= entropy[np.setdiff1d(train, kept)].max()  # the surest left out
    assert len(uncertain_rows(train, entropy, needed=len(train) // 2, share=0.2)) == len(train) // 2  # widened
    for group in user_groups(samples, kept, 4, np.random.default_rng(0)):
        assert set(group.rows) <= set(kept) and len({samples.user[r] for r in group.rows}) == 1
        times = samples.timestamp[list(group.rows)]
        history = [h for h in samples.history[group.anchor] if h >= 0]
        assert all(samples.timestamp[h] < times.min() for h in history)  # still no leak


def test_snapshot_groups_share_a_history_only_within_size_interactions(samples):
    valid = samples.indices("valid")
    rows = valid[::2]
    groups = snapshot_groups(samples, rows, 3)
    assert sorted(group_rows(groups).tolist()) == sorted(rows.tolist())
    assert any(len(g) > 1 for g in groups)
    for group in groups:
        user = samples.user[group.anchor]
        user_rows = np.flatnonzero(samples.user == user).tolist()
        places = [user_rows.index(r) for r in group.rows]
        assert len(group) <= 3 and places[-1] - places[0] < 3 and places == sorted(places)


def test_scoring_groups_equals_scoring_each_prompt_whole(tiny_gguf, samples):
    scorer = LLMScorer.load(resolve_base_llm(str(tiny_gguf)), samples.prompt_template(400), LoRAConfig(dropout=0.0))
    _randomize_adapters(scorer)
    prompts = GroupPrompts(samples, scorer)
    rows = samples.indices("test")[:30]
    # a group of one is the row's own prompt, split where serving splits it
    assert all(prompts.prompt(int(r)) == scorer.prompt_ids(*samples.prompt_parts(int(r))) for r in rows)
    groups = snapshot_groups(samples, rows, 4)
    shared = score_groups(scorer, prompts, groups, batch_size=4)
    whole = score_groups(scorer, prompts, groups, batch_size=4, shared_prefix=False)
    assert np.allclose(shared, whole, atol=1e-5) and len(shared) == 30
    # exact histories: rows whose histories coincide share one prefix pass, and the answers are each row's own
    exact = score_llm(scorer, prompts, rows, batch_size=4)
    one_by_one = score_groups(scorer, prompts, [PrefixGroup(int(r), (int(r),)) for r in rows], batch_size=1)
    assert np.allclose(exact, one_by_one, atol=1e-5)
    merged = same_history_groups(samples, rows)
    assert all(len({tuple(samples.history[r]) for r in g.rows}) == 1 for g in merged)
