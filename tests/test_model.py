"""The transformer: shapes, causality, KV cache, architectures, sizes."""

import copy

import pytest
import torch

from scratchlm.errors import ConfigError
from scratchlm.model import GPT, ModelConfig, count_params, flops_per_token, get_preset
from scratchlm.model.model import rope_tables

GPT2_TINY = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
LLAMA_TINY = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
ARCHITECTURES = {
    "gpt2": GPT2_TINY,
    "llama-gqa": LLAMA_TINY,
    "qknorm-relu2": LLAMA_TINY.replace(qk_norm=True, mlp="relu2", n_kv_head=1),
}


@pytest.fixture(params=list(ARCHITECTURES))
def model(request) -> GPT:
    torch.manual_seed(0)
    return GPT(ARCHITECTURES[request.param]).eval()


def test_logits_have_shape_batch_time_vocab(model):
    idx = torch.randint(0, 97, (3, 11))
    logits, loss = model(idx)
    assert logits.shape == (3, 11, 97) and loss is None


def test_future_tokens_do_not_change_past_logits(model):
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 97, (2, 8))
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_kv_cache_in_chunks_equals_full_recomputation(model):
    idx = torch.randint(0, 97, (2, 24))
    full, _ = model(idx)
    cache = model.new_cache(batch=2, max_len=32)
    pieces = [model(idx[:, a:b], cache=cache)[0] for a, b in [(0, 7), (7, 8), (8, 15), (15, 16), (16, 24)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [24, 24]


def test_rows_of_different_lengths_decode_as_if_each_were_alone(model):
    """Right-padded prompts of lengths 5 and 9 in one batch: after setting each row's length,
    the next tokens' logits equal those of each sequence run by itself."""
    torch.manual_seed(1)
    seqs = [torch.randint(0, 97, (12,)), torch.randint(0, 97, (12,))]
    lengths = [5, 9]
    cache = model.new_cache(batch=2, max_len=32)
    padded = torch.stack([torch.cat([s[:n], torch.zeros(9 - n, dtype=torch.long)]) for s, n in zip(seqs, lengths)])
    model(padded, cache=cache)
    cache.lengths = torch.tensor(lengths)  # padding keys stay in the cache but are never visible
    for step in range(3):
        nxt = torch.stack([s[n + step : n + step + 1] for s, n in zip(seqs, lengths)])
        batched, _ = model(nxt, cache=cache)
        for row, (s, n) in enumerate(zip(seqs, lengths)):
            alone, _ = model(s[None, : n + step + 1])
            torch.testing.assert_close(batched[row, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_a_view_of_cache_rows_writes_into_the_batch_cache(model):
    cache = model.new_cache(batch=3, max_len=16)
    model(torch.randint(0, 97, (1, 4)), cache=cache.rows(1, 2))
    assert cache.lengths.tolist() == [0, 4, 0]
    assert cache.keys[0][1, :, :4].abs().sum() > 0 and cache.keys[0][0].abs().sum() == 0


def test_sequence_longer_than_context_is_refused(model):
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_each_architecture_lowers_the_loss_on_a_tiny_corpus(name):
    torch.manual_seed(0)
    model = GPT(ARCHITECTURES[name])
    pattern = torch.tensor([5, 17, 42, 8, 91, 3, 17, 60] * 8)  # a repeating sequence to memorise
    x, y = pattern[:-1].view(1, -1)[:, :32], pattern[1:].view(1, -1)[:, :32]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first * 0.3


def test_ignored_targets_do_not_count_in_the_loss():
    torch.manual_seed(0)
    model = GPT(GPT2_TINY)
    idx = torch.randint(0, 97, (1, 10))
    targets = torch.randint(0, 97, (1, 10))
    _, half = model(idx, torch.where(torch.arange(10) < 5, targets, -100))
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[0, :5], targets[0, :5])
    torch.testing.assert_close(half, expected)


def test_tied_embeddings_share_one_tensor():
    model = GPT(GPT2_TINY)
    assert model.head.weight is model.embed.weight
    assert GPT(LLAMA_TINY).head.weight is not GPT(LLAMA_TINY).embed.weight


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    config = get_preset("cpu-base")
    model = GPT(config)
    expected = config.init_std / (2 * config.n_layer) ** 0.5
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert model.blocks[0].attn.q.weight.std().item() == pytest.approx(config.init_std, rel=0.1)
    assert model.blocks[0].mlp.gate.weight.std().item() == pytest.approx(config.init_std, rel=0.1)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(expected, rel=0.1)


def test_attention_over_some_heads_sums_to_the_whole_as_tensor_parallel_ranks_do():
    """A rank holding half the query heads and their key/value heads (rows of q, k, v; columns
    of proj) computes its share: the two halves' outputs add up to the full attention's."""
    torch.manual_seed(0)
    full = GPT(LLAMA_TINY).blocks[0].attn.eval()
    hd, nh, nkv = LLAMA_TINY.head_dim, LLAMA_TINY.n_head, LLAMA_TINY.kv_heads
    x = torch.randn(2, 7, LLAMA_TINY.n_embd)
    rope = tuple(t[:7][None, None] for t in rope_tables(LLAMA_TINY, 7))
    halves = []
    for rank in range(2):
        part = copy.deepcopy(full)
        q_rows, kv_rows = slice(rank * nh // 2 * hd, (rank + 1) * nh // 2 * hd), slice(rank * nkv // 2 * hd, (rank + 1) * nkv // 2 * hd)
        with torch.no_grad():
            for linear, rows in [(part.q, q_rows), (part.k, kv_rows), (part.v, kv_rows)]:
                linear.weight = torch.nn.Parameter(linear.weight[rows])
            part.proj.weight = torch.nn.Parameter(part.proj.weight[:, q_rows])
            halves.append(part(x, rope, None, 0))
    with torch.no_grad():
        torch.testing.assert_close(halves[0] + halves[1], full(x, rope, None, 0))


@pytest.mark.parametrize(("preset", "millions"), [("gpt2-124m", 124.5), ("smollm2-135m", 134.5), ("gpt2-350m", 354.9)])
def test_preset_parameter_counts_match_the_published_models(preset, millions):
    assert count_params(get_preset(preset)) / 1e6 == pytest.approx(millions, abs=0.1)


def test_smollm2_preset_has_its_exact_shapes():
    config = get_preset("smollm2-135m")
    assert (config.n_layer, config.n_head, config.kv_heads, config.n_embd, config.hidden) == (30, 9, 3, 576, 1536)
    assert (config.vocab_size, config.rope_base, config.tie_embeddings) == (49152, 100000.0, True)


def test_flops_per_token_is_six_times_matmul_params_plus_attention():
    config = get_preset("gpt2-124m")
    matmul = count_params(config, include_embeddings=False) + config.vocab_size * config.n_embd
    assert flops_per_token(config) == 6 * matmul + 12 * 12 * 768 * 1024


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"n_embd": 30}, "divisible by n_head"), ({"n_kv_head": 3}, "multiple of n_kv_head"), ({"norm": "batchnorm"}, "norm must be"),
     ({"dropout": 1.5}, "dropout must be")],
)
def test_invalid_model_configs_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        GPT2_TINY.replace(**changes)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'gpt2-124m'"):
        get_preset("gpt2-124")


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_packed_documents_give_the_logits_of_each_document_alone(name):
    torch.manual_seed(0)
    model = GPT(ARCHITECTURES[name]).eval()
    docs = [torch.randint(0, 97, (n,)) for n in (5, 9, 3)]
    packed = torch.cat(docs)[None]
    documents = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    logits, _ = model(packed, documents=documents)
    alone = torch.cat([model(d[None])[0] for d in docs], dim=1)
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)
    unmasked, _ = model(packed)
    assert not torch.allclose(unmasked[:, 5:], alone[:, 5:], atol=1e-3)  # without it, documents see each other


def test_document_positions_restart_at_each_document():
    from scratchlm.model.model import document_positions

    documents = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1, -1]])
    assert document_positions(documents).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 0, 1]]
