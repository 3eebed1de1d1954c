"""Tests for vitdsi.py: attention against torch's reference, the invariants of the decoder and the patch
embedding, constrained beam search against exhaustive scoring, and learning a tiny database."""
import math

import pytest
import torch
import torch.nn.functional as F

from data import BOS, EOS, PAD
from vitdsi import (Dropout, IDTrie, MultiHeadAttention, PatchEmbedding, SinusoidalPositionalEncoding, ViTDSI,
                    ViTDSIConfig, attention, causal_mask, dropout, score_all_ids, set_dropout)

SMALL = dict(image_size=32, patch_size=8, dim=32, mlp_dim=64, depth=2, heads=4)


def small_model(seed: int = 0, **overrides) -> ViTDSI:
    torch.manual_seed(seed)
    return ViTDSI(ViTDSIConfig(**{**SMALL, **overrides}))


def test_causal_mask_lets_each_position_see_itself_and_the_past():
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_the_encoder_split_at_any_block_is_the_whole_encoder():
    model = small_model().eval()
    images = torch.randn(3, 3, 32, 32)
    encoder = model.encoder
    whole = encoder(images)
    assert torch.equal(model.encode(images), whole)
    for k in range(len(encoder.blocks) + 1):
        assert torch.equal(encoder.after(encoder.until(images, k), k), whole)
    assert not torch.allclose(encoder.until(images, 1), encoder.until(images, 2))   # k counts blocks


def test_state_dict_names_follow_the_modules():
    keys = set(small_model(pos_encoding="learned").state_dict())
    assert {"encoder.patch_embedding.to_patch_embedding.weight", "encoder.pos.pe", "encoder.norm.weight",
            "encoder.blocks.0.attn.to_qkv.weight", "encoder.blocks.1.mlp.3.bias", "token_embedding.weight",
            "decoder_pos.pe", "decoder.0.cross_attn.to_kv.weight", "decoder_norm.weight", "head.weight"} <= keys
    part = lambda key: ".".join(key.split(".")[:2 if key.startswith("encoder.") else 1])   # noqa: E731
    assert {part(key) for key in keys} == {"encoder.patch_embedding", "encoder.pos", "encoder.blocks",
                                           "encoder.norm", "token_embedding", "decoder_pos", "decoder",
                                           "decoder_norm", "head"}   # so no "encoder_norm", no "encoder.0"
    sinusoidal = set(small_model().state_dict())   # fixed positions are rebuilt from the config, not stored
    assert sinusoidal == keys - {"encoder.pos.pe", "decoder_pos.pe"}


def test_attention_matches_scaled_dot_product_attention():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    k = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    v = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    random_mask = torch.rand(2, 3, 5, 7) < 0.5
    random_mask[..., 0] = True   # every query sees at least one key
    for mask in (None, causal_mask(7)[:5], random_mask):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)   # also True = may attend
        torch.testing.assert_close(attention(q, k, v, mask), expected)


def test_multi_head_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    dim, heads = 16, 4
    ours = MultiHeadAttention(dim=dim, heads=heads).double()
    ref = torch.nn.MultiheadAttention(dim, heads, batch_first=True).double()
    with torch.no_grad():   # torch packs q, k, v projections in one matrix in the same order as to_qkv
        ref.in_proj_weight.copy_(ours.to_qkv.weight)
        ref.in_proj_bias.copy_(ours.to_qkv.bias)
        ref.out_proj.weight.copy_(ours.to_out.weight)
        ref.out_proj.bias.copy_(ours.to_out.bias)
    x = torch.randn(3, 6, dim, dtype=torch.float64)
    mask = causal_mask(6)
    expected, _ = ref(x, x, x, attn_mask=~mask, need_weights=False)   # torch's MHA: True = may NOT attend
    torch.testing.assert_close(ours(x, mask=mask), expected)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0])


def test_dropout_from_random_words_drops_p_of_the_elements_independently_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(400, 1000)
    for p in (0.1, 0.5):
        y = dropout(x, p)
        dropped = y == 0
        # 4e5 draws: the dropped share is within 5 standard deviations of p; neighbours (lanes of one word,
        # and the last lane of one word next to the first of the next) are dropped together as often as p^2.
        assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / x.numel())
        both = (dropped[:, :-1] & dropped[:, 1:]).float().mean().item()
        assert abs(both - p * p) < 5 * math.sqrt(p * p / x.numel())
        torch.testing.assert_close(y[~dropped], torch.full_like(y[~dropped], 1 / (1 - p)))
        assert not torch.equal(dropped, dropout(x, p) == 0)          # a new mask every call
    every_lane = dropout(x, 0.5).view(-1, 4) == 0                       # the four 16-bit lanes of each word
    assert (every_lane.float().mean(0) - 0.5).abs().max() < 0.01        # (the top lane has one bit fewer)
    assert dropout(x, 0.0) is x


def test_dropout_module_follows_train_mode_and_set_dropout_draws():
    torch.manual_seed(0)
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    module = Dropout(0.25)
    assert module(x).dtype == torch.bfloat16 and (module(x) == 0).any()
    assert module.eval()(x) is x
    model = small_model()
    set_dropout(model, 0.3, "torch")
    drops = [m for m in model.modules() if isinstance(m, (Dropout, MultiHeadAttention))]
    assert drops and all(m.draw == "torch" for m in drops)
    assert all((m.p if isinstance(m, Dropout) else m.dropout) == 0.3 for m in drops)
    torch.manual_seed(1)
    expected = F.dropout(x, 0.3)
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.3, "torch"), expected)             # "torch" is torch's own draw
    set_dropout(model, 0.0)                                             # the rate alone: the draw stays
    assert all(m.draw == "torch" for m in drops)


def test_sinusoidal_encoding_matches_the_formula():
    # D = 8: frequencies 1 / 10000^(2i/8) = 1, 1/10, 1/100, 1/1000
    pe = SinusoidalPositionalEncoding(dim=8, max_len=50).pe
    assert pe[0].tolist() == [0.0, 1.0] * 4
    expected = {(1, 0): math.sin(1), (1, 1): math.cos(1), (3, 2): math.sin(0.3), (3, 3): math.cos(0.3),
                (20, 4): math.sin(0.2), (49, 7): math.cos(0.049)}
    for (pos, col), value in expected.items():
        assert pe[pos, col].item() == pytest.approx(value, abs=1e-6)


def test_patch_embedding_covers_the_image_exactly_once():
    torch.manual_seed(0)
    channels, p = 3, 4
    embed = PatchEmbedding(image_size=12, patch_size=p, channels=channels, dim=channels * p * p)
    with torch.no_grad():   # identity projection: the embedding is the raw patch
        embed.to_patch_embedding.weight.copy_(torch.eye(channels * p * p))
        embed.to_patch_embedding.bias.zero_()
    images = torch.randn(2, channels, 12, 12)
    patches = embed(images)                                                      # (B, N, P)
    torch.testing.assert_close(patches, F.unfold(images, p, stride=p).transpose(1, 2))
    # fold sums overlapping pixels, so getting the image back means each pixel sits in exactly one patch
    assert torch.equal(F.fold(patches.transpose(1, 2), (12, 12), p, stride=p), images)


def test_patch_size_must_divide_the_image():
    with pytest.raises(ValueError, match="divisible"):
        ViTDSIConfig(image_size=30, patch_size=8)
    with pytest.raises(AssertionError, match="divisible"):
        PatchEmbedding(image_size=30, patch_size=8, channels=3, dim=16)


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
def test_later_tokens_do_not_change_earlier_logits(pos_encoding):
    model = small_model(pos_encoding=pos_encoding).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.tensor([[BOS, 1, 2, 3, EOS], [BOS, 4, 5, 6, EOS]])
    changed = tokens.clone()
    changed[:, 3] = 9
    with torch.no_grad():
        before, after = model(images, tokens), model(images, changed)
    torch.testing.assert_close(after[:, :3], before[:, :3])
    assert not torch.allclose(after[:, 3:], before[:, 3:])   # the change is seen from its own position on


def with_patch_changed(images: torch.Tensor, patch: int, p: int = SMALL["patch_size"]) -> torch.Tensor:
    """A copy of images (B, C, S, S) with other pixels in patch number `patch` (patches row by row)."""
    row, col = divmod(patch, images.shape[-1] // p)
    changed = images.clone()
    changed[..., row * p:(row + 1) * p, col * p:(col + 1) * p] += 1.0
    return changed


def test_every_patch_encoding_sees_every_patch():
    """The encoder is bidirectional (paper §3.2, as in ViT): changing the last patch changes the first
    patch's encoding, changing the first changes the last's, and so for every patch."""
    model = small_model().eval()
    images = torch.randn(2, 3, 32, 32)
    n = model.encoder.patch_embedding.num_patches
    with torch.no_grad():
        before = model.encode(images)                                          # (B, N, D)
        for patch in (0, n - 1):
            after = model.encode(with_patch_changed(images, patch))
            moved = (after - before).abs().amax(dim=-1)                        # (B, N)
            assert (moved > 1e-4).all(), f"patch {patch} left {(moved <= 1e-4).nonzero().tolist()} unchanged"


def test_every_id_token_reads_every_patch():
    """Cross-attention reads all patches: changing the encoder's output at any one patch (first, middle,
    last) changes the logits at every decoder position. The change is made to the memory, not the image,
    because the bidirectional encoder would carry an image change to every patch anyway."""
    model = small_model().eval()
    tokens = torch.tensor([[BOS, 1, 2, 3, EOS], [BOS, 4, 5, 6, EOS]])
    n = model.encoder.patch_embedding.num_patches
    with torch.no_grad():
        memory = model.encode(torch.randn(2, 3, 32, 32))                      # (B, N, D)
        before = model.decode(memory, tokens)                                  # (B, L, V)
        for patch in (0, n // 2, n - 1):
            other = memory.clone()
            other[:, patch] = torch.randn_like(other[:, patch])
            moved = (model.decode(other, tokens) - before).abs().amax(dim=-1)  # (B, L)
            assert (moved > 1e-4).all(), f"changing patch {patch} left positions {(moved <= 1e-4).nonzero().tolist()}"


def test_decode_shares_one_memory_among_the_sequences_of_an_image():
    model = small_model().eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(0, 10, (2 * 3, 4))   # G = 3 sequences per image
    with torch.no_grad():
        memory = model.encode(images)
        grouped = model.decode(memory, tokens)
        copied = model.decode(memory.repeat_interleave(3, dim=0), tokens)
    torch.testing.assert_close(grouped, copied)


def test_trie_tensors_follow_the_ids():
    trie = IDTrie(["7", "71", "8"])
    after_7 = trie.children[0, 7].item()
    assert trie.allowed[0].nonzero().flatten().tolist() == [7, 8]
    assert trie.allowed[after_7].nonzero().flatten().tolist() == [1, EOS]   # "7" may end or go on
    assert trie.id_of_node[trie.children[after_7, EOS]].item() == 0
    assert trie.sequences.tolist() == [[BOS, 7, EOS, PAD], [BOS, 7, 1, EOS], [BOS, 8, EOS, PAD]]
    for bad in (["1", "1"], ["1a"], [""], []):
        with pytest.raises(ValueError):
            IDTrie(bad)


def check_ranked(ranked, ids, k):
    got = [i for i, _ in ranked]
    scores = [s for _, s in ranked]
    assert len(got) == min(k, len(ids))
    assert len(set(got)) == len(got) and set(got) <= set(ids)
    assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) and s <= 0 for s in scores)


def test_beam_search_returns_distinct_valid_ids():
    model = small_model()
    ids = [f"{i:02d}" for i in range(0, 60, 3)]   # 20 IDs out of 100 possible
    trie = IDTrie(ids)
    images = torch.randn(3, 3, 32, 32)
    for k, beam in ((1, None), (1, 3), (5, None), (5, 2), (20, None), (50, None), (50, 60)):
        for ranked in model.generate(images, trie, k=k, beam=beam):   # beam 2 < k = 5 is widened to 5
            check_ranked(ranked, ids, k)
    assert model.training   # generate switched dropout off and gave the model back as it was


ID_SETS = {
    "fixed width": [f"{i:03d}" for i in torch.randperm(1000, generator=torch.Generator().manual_seed(1))[:60]],
    "variable length": ["7", "70", "71", "712", "8", "80", "123", "9", "99", "990", "5", "51", "512", "5120"],
}


@pytest.mark.parametrize("name", list(ID_SETS))
def test_wide_beam_equals_exhaustive_scoring(name):
    ids = ID_SETS[name]
    trie = IDTrie(ids)
    model = small_model(seed=3).double()   # float64 so that near-ties keep their order in both computations
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    exhaustive = score_all_ids(model, images, trie, ids_per_call=7)   # chunks that do not divide n
    # the constrained scores form a probability distribution over the database's IDs
    torch.testing.assert_close(exhaustive.exp().sum(dim=1), torch.ones(4, dtype=torch.float64))
    for k in (len(ids), 5):
        for row, ranked in zip(exhaustive, model.generate(images, trie, k=k, beam=len(ids))):
            order = row.argsort(descending=True)[:k]
            assert [i for i, _ in ranked] == [ids[j] for j in order]
            torch.testing.assert_close(torch.tensor([s for _, s in ranked], dtype=torch.float64), row[order])


def test_wide_beam_finds_the_best_id_that_greedy_decoding_misses():
    # A nearly uniform model tilted towards token 0: p("0") = e/(e+1) = 0.73 at the first digit, but "0"
    # then spreads its mass over nine continuations (~0.73/9 = 0.08 each) while "1" has one, so "15" (0.27)
    # is the best ID, and greedy decoding (beam 1), which commits to "0", misses it.
    ids = [f"0{d}" for d in range(1, 10)] + ["15"]
    trie = IDTrie(ids)
    model = small_model(seed=5).double()
    with torch.no_grad():
        model.head.weight.mul_(1e-3)
        model.head.bias.zero_()
        model.head.bias[0] = 1.0
    images = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    best = [ids[j] for j in score_all_ids(model, images, trie).argmax(dim=1)]
    wide = [ranked[0][0] for ranked in model.generate(images, trie, k=1, beam=len(ids))]
    greedy = [ranked[0][0] for ranked in model.generate(images, trie, k=1)]
    assert wide == best == ["15"] * len(images)
    assert all(g != b for g, b in zip(greedy, best))   # so the case really tests the width


def test_narrow_beam_scores_are_the_exact_scores_of_its_ids():
    ids = ID_SETS["fixed width"]
    model = small_model(seed=4).double()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    exhaustive = score_all_ids(model, images, IDTrie(ids))
    for row, ranked in zip(exhaustive, model.generate(images, IDTrie(ids), k=4)):
        check_ranked(ranked, ids, 4)
        for id_str, score in ranked:
            assert score == pytest.approx(row[ids.index(id_str)].item(), abs=1e-9)


def test_runs_under_bf16_autocast():
    model = small_model()
    images = torch.randn(4, 3, 32, 32)
    tokens = torch.tensor([[BOS, 1, 2, EOS]] * 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images, tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        ranked = model.generate(images, IDTrie(["12", "13", "21"]), k=3)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    for row in ranked:
        check_ranked(row, ["12", "13", "21"], 3)


def test_overfits_a_tiny_database():
    torch.manual_seed(0)
    model = ViTDSI(ViTDSIConfig(**{**SMALL, "dim": 64, "mlp_dim": 128}, dropout=0.0))
    images = torch.rand(16, 3, 32, 32) * 2 - 1
    ids = [f"{i:02d}" for i in range(16)]
    trie = IDTrie(ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    accuracy = 0.0
    for step in range(1, 201):
        logits = model(images, trie.sequences[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), trie.sequences[:, 1:].flatten(), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            ranked = model.generate(images, trie, k=1)
            accuracy = sum(r[0][0] == i for r, i in zip(ranked, ids)) / len(ids)   # IA@1
            if accuracy == 1.0:
                break
    assert accuracy == 1.0, f"IA@1 {accuracy} after {step} steps (loss {loss.item():.3f})"
