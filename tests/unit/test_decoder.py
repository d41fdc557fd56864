"""The Transformer decoder: causal masking, KV-cache equivalence, beam search against greedy, stopping."""
import pytest
import torch

from mmray.models.decoder import TextDecoder

VOCAB, PAD, BOS, EOS, MAX_LEN, B, S = 40, 0, 2, 3, 16, 3, 7


def _decoder(seed=0):
    """A random decoder in float64, so that cached and uncached logits never tie differently by rounding."""
    torch.manual_seed(seed)
    dec = TextDecoder(VOCAB, MAX_LEN, 32, 2, 4, PAD, memory_widths=(24, 16)).double().eval()
    for p in dec.parameters():   # larger than the training init, so that greedy picks differ between steps
        torch.nn.init.normal_(p, std=0.3)
    streams = [(torch.randn(B, 5, 24, dtype=torch.float64), None),
               (torch.randn(B, 2, 16, dtype=torch.float64), torch.tensor([[True, True], [True, False], [True, False]]))]
    memory, mask = dec.adapt(streams)
    return dec, memory, mask


def test_memory_streams_are_projected_and_concatenated():
    _, memory, mask = _decoder()
    assert memory.shape == (B, S, 32) and mask.shape == (B, S) and mask.sum().item() == B * 5 + 4


def test_decoder_is_causal():
    dec, memory, mask = _decoder()
    ids = torch.randint(4, VOCAB, (B, 10))
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1 - 4) % (VOCAB - 4) + 4
    a, b = dec(ids, memory, mask), dec(changed, memory, mask)
    assert torch.allclose(a[:, :6], b[:, :6]) and not torch.allclose(a[:, 6:], b[:, 6:])


def test_padded_memory_is_ignored():
    dec, memory, mask = _decoder()
    ids = torch.randint(4, VOCAB, (B, 6))
    noisy = memory.clone()
    noisy[~mask] = 1e3
    assert torch.allclose(dec(ids, memory, mask), dec(ids, noisy, mask))


def test_cached_steps_give_the_teacher_forced_logits():
    dec, memory, mask = _decoder()
    ids = torch.randint(4, VOCAB, (B, 8))
    full = dec(ids, memory, mask)
    caches, kv = [{} for _ in dec.blocks], dec.memory_kv(memory)
    steps = [dec.run(ids[:, t:t + 1], t, kv, mask, caches)[:, 0] for t in range(8)]
    assert torch.allclose(torch.stack(steps, dim=1), full, atol=1e-10)


@pytest.mark.parametrize("beam_width", [1, 3])
def test_kv_cache_gives_the_same_tokens(beam_width):
    for seed in range(3):
        dec, memory, mask = _decoder(seed)
        cached = dec.generate(memory, mask, BOS, EOS, beam_width=beam_width, use_cache=True)
        uncached = dec.generate(memory, mask, BOS, EOS, beam_width=beam_width, use_cache=False)
        assert torch.equal(cached, uncached)
        assert cached.shape[1] > 2, "a vacuous test: decoding stopped at once"


def test_beam_width_one_is_greedy():
    for seed in range(3):
        dec, memory, mask = _decoder(seed)
        greedy = dec._greedy(_stepper(dec, memory, mask), B, BOS, EOS, MAX_LEN - 1)
        beam = dec._beam(_stepper(dec, memory, mask), B, 1, BOS, EOS, MAX_LEN - 1, length_penalty=0.0)
        assert torch.equal(greedy, beam)


def _stepper(dec, memory, mask):
    from mmray.models.decoder import _Stepper

    return _Stepper(dec, memory, mask, use_cache=True, bos_id=BOS)


def test_beam_search_scores_at_least_as_well_as_greedy():
    dec, memory, mask = _decoder()

    def logprob(seqs):
        ids = torch.cat([torch.full((B, 1), BOS), seqs], dim=1)
        logp = dec(ids[:, :-1], memory, mask).log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        return logp.masked_fill(ids[:, :-1] == EOS, 0).masked_fill(ids[:, 1:] == PAD, 0).sum(1)

    greedy = dec.generate(memory, mask, BOS, EOS, max_new_tokens=6)
    beam = dec.generate(memory, mask, BOS, EOS, max_new_tokens=6, beam_width=4)
    assert (logprob(beam) >= logprob(greedy) - 1e-9).all()


def _always(dec, token):
    """Make the decoder predict ``token`` at every step, whatever the input."""
    with torch.no_grad():
        dec.ln_final.weight.zero_()
        dec.ln_final.bias.zero_()
        dec.ln_final.bias[0] = 1.0
        dec.lm_head.weight.zero_()
        dec.lm_head.weight[token, 0] = 10.0


@pytest.mark.parametrize("beam_width", [1, 3])
def test_generation_stops_at_eos_and_at_max_length(beam_width):
    dec, memory, mask = _decoder()
    _always(dec, EOS)
    assert dec.generate(memory, mask, BOS, EOS, beam_width=beam_width).tolist() == [[EOS]] * B
    _always(dec, 7)
    out = dec.generate(memory, mask, BOS, EOS, max_new_tokens=5, beam_width=beam_width)
    assert out.tolist() == [[7] * 5] * B
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate(memory, mask, BOS, EOS, max_new_tokens=MAX_LEN)


@pytest.mark.parametrize("beam_width", [1, 3])
def test_only_padding_follows_eos(beam_width):
    for seed in range(3):
        dec, memory, mask = _decoder(seed)
        with torch.no_grad():
            dec.lm_head.weight[EOS] += 0.4   # EOS now likely enough to end some rows early, not all
        out = dec.generate(memory, mask, BOS, EOS, beam_width=beam_width)
        for row in out.tolist():
            if EOS in row:
                assert set(row[row.index(EOS) + 1:]) <= {PAD}
            assert PAD not in row[:row.index(EOS) if EOS in row else len(row)]
