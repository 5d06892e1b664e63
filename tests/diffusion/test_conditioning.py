"""A1111-style conditioning: equal to diffusers for plain prompts; chunks, BREAK, weights, schedules."""
from __future__ import annotations

import pytest
import torch

from modules.diffusion import checkpoints as ck
from modules.diffusion.conditioning import chunk_prompt, encode_schedule
from modules.diffusion.loading import load_sd_model


@pytest.fixture(scope="module")
def infos(fixture_data_dir):
    return ck.list_checkpoints(fixture_data_dir / "models" / "Stable-diffusion", compute_hashes=False)


@pytest.fixture(scope="module")
def sd15(infos):
    return load_sd_model(ck.find_checkpoint(infos, "tiny-sd15"))


@pytest.fixture(scope="module")
def sdxl(infos):
    return load_sd_model(ck.find_checkpoint(infos, "tiny-sdxl"))


def _plain(sd, text):
    """One 77-token chunk of *text* encoded by hand (SD1: last hidden state with final norm)."""
    tok = sd.pipe.tokenizer
    ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return sd.pipe.text_encoder(ids)[0]


def test_sd15_plain_prompt_equals_diffusers_encode_prompt(sd15):
    sched = encode_schedule(sd15, "a photo of a cat", "blurry, ugly", 20, 2)
    ref_pos, ref_neg = sd15.pipe.encode_prompt("a photo of a cat", "cpu", 2, True, negative_prompt="blurry, ugly")
    kw = sched.at_step(0)
    assert torch.equal(kw["prompt_embeds"], ref_pos) and torch.equal(kw["negative_prompt_embeds"], ref_neg)
    assert sched.switch_steps == set()


def test_sd15_clip_skip_2_uses_the_penultimate_layer_with_final_norm(sd15):
    # (what diffusers' encode_prompt(clip_skip=1) computes; it cannot run here because transformers 5
    # removed CLIPTextModel.text_model, which that code path reads)
    kw = encode_schedule(sd15, "a red house", "", 4, 1, clip_skip=2).at_step(0)
    enc = sd15.pipe.text_encoder
    ids = sd15.pipe.tokenizer("a red house", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = enc(ids, output_hidden_states=True).hidden_states[-2]
        expected = enc.final_layer_norm(hidden)
    assert torch.equal(kw["prompt_embeds"], expected)
    assert not torch.equal(expected, _plain(sd15, "a red house"))


def test_sdxl_plain_prompt_equals_diffusers_and_empty_negative_is_zero(sdxl):
    kw = encode_schedule(sdxl, "a photo of a dog", "blurry", 20, 1).at_step(0)
    pos, neg, pooled, neg_pooled = sdxl.pipe.encode_prompt("a photo of a dog", device="cpu", num_images_per_prompt=1,
                                                           do_classifier_free_guidance=True, negative_prompt="blurry")
    assert torch.equal(kw["prompt_embeds"], pos) and torch.equal(kw["negative_prompt_embeds"], neg)
    assert torch.equal(kw["pooled_prompt_embeds"], pooled)
    assert torch.equal(kw["negative_pooled_prompt_embeds"], neg_pooled)
    assert kw["prompt_embeds"].shape == (1, 77, 32 + 48)
    zero = encode_schedule(sdxl, "a photo of a dog", "", 20, 3).at_step(0)
    assert zero["negative_prompt_embeds"].shape == (3, 77, 80) and not zero["negative_prompt_embeds"].any()
    assert not zero["negative_pooled_prompt_embeds"].any()


def test_weights_scale_tokens_and_restore_the_mean(sd15):
    base = _plain(sd15, "a cat")
    weighted = encode_schedule(sd15, "a (cat:1.5)", "", 4, 1).at_step(0)["prompt_embeds"]
    (chunk,) = chunk_prompt(sd15.pipe, sd15.pipe.tokenizer, "a (cat:1.5)")
    assert chunk.weights[0] == 1.0 and set(chunk.weights[1:]) == {1.5}
    weights = torch.ones(77)
    weights[1:1 + len(chunk.weights)] = torch.tensor(chunk.weights)  # after BOS
    expected = base * weights.reshape(1, -1, 1)
    expected = expected * (base.mean() / expected.mean())
    assert torch.allclose(weighted, expected, atol=1e-6)
    assert weighted.mean().item() == pytest.approx(base.mean().item(), rel=1e-5)
    assert not torch.allclose(weighted, base)
    lighter = encode_schedule(sd15, "a [cat]", "", 4, 1).at_step(0)["prompt_embeds"]
    assert not torch.allclose(lighter, base)


def test_long_prompt_is_chunked_by_75_tokens(sd15):
    words = ["cat", "dog", "sun", "sky", "tree"] * 20  # 100 single-token words, no commas
    prompt = " ".join(words)
    kw = encode_schedule(sd15, prompt, "blurry", 4, 1).at_step(0)
    assert kw["prompt_embeds"].shape == (1, 154, 32)
    assert torch.equal(kw["prompt_embeds"][:, :77], _plain(sd15, " ".join(words[:75])))
    assert torch.equal(kw["prompt_embeds"][:, 77:], _plain(sd15, " ".join(words[75:])))
    # the negative side is padded with the empty prompt's chunk to the same length
    assert kw["negative_prompt_embeds"].shape == (1, 154, 32)
    assert torch.equal(kw["negative_prompt_embeds"][:, 77:], _plain(sd15, ""))


def test_break_starts_a_new_chunk(sd15):
    kw = encode_schedule(sd15, "a cat BREAK a dog", "", 4, 1).at_step(0)
    assert kw["prompt_embeds"].shape == (1, 154, 32)
    assert torch.equal(kw["prompt_embeds"][:, :77], _plain(sd15, "a cat"))
    assert torch.equal(kw["prompt_embeds"][:, 77:], _plain(sd15, "a dog"))


def test_comma_backtrack_moves_the_tail_to_the_next_chunk(sd15):
    tok = sd15.pipe.tokenizer
    words = ["cat"] * 70 + [","] + ["dog"] * 10  # the chunk fills 4 tokens after the comma
    chunks = chunk_prompt(sd15.pipe, tok, " ".join(words))
    assert [len(c.tokens) for c in chunks] == [71, 10]
    no_backtrack = chunk_prompt(sd15.pipe, tok, " ".join(words), comma_backtrack=0)
    assert [len(c.tokens) for c in no_backtrack] == [75, 6]


def test_prompt_editing_switches_embeddings_at_the_right_step(sd15):
    sched = encode_schedule(sd15, "a [cat:dog:5]", "", 10, 1)
    assert sched.switch_steps == {6}
    assert sched.at_step(0) is sched.at_step(5)
    assert torch.equal(sched.at_step(0)["prompt_embeds"], _plain(sd15, "a cat"))
    assert torch.equal(sched.at_step(6)["prompt_embeds"], _plain(sd15, "a dog"))
    alternating = encode_schedule(sd15, "[cat|dog]", "", 6, 1)
    assert alternating.switch_steps == {2, 3, 4, 5}
    assert torch.equal(alternating.at_step(2)["prompt_embeds"], _plain(sd15, "dog"))


def test_negative_prompt_schedule_and_hires_steps(sd15):
    sched = encode_schedule(sd15, "a [cat:dog:15]", "[blurry::0.5]", 10, 1, hires_steps=10)
    # base pass: cat throughout; negative drops "blurry" after step 5
    assert sched.switch_steps == {6, 16}
    assert torch.equal(sched.at_step(0)["negative_prompt_embeds"], _plain(sd15, "blurry"))
    assert torch.equal(sched.at_step(6)["negative_prompt_embeds"], _plain(sd15, ""))
    # hires pass (indices 10..19): integer 15 is hires step 5
    assert torch.equal(sched.at_step(15)["prompt_embeds"], _plain(sd15, "a cat"))
    assert torch.equal(sched.at_step(16)["prompt_embeds"], _plain(sd15, "a dog"))
    assert sched.total_steps == 20


def test_batch_size_repeats_embeddings(sdxl):
    kw = encode_schedule(sdxl, "a (dog:1.2)", "ugly", 4, 3).at_step(0)
    assert kw["prompt_embeds"].shape == (3, 77, 80)
    assert kw["pooled_prompt_embeds"].shape == (3, 48)
    assert torch.equal(kw["prompt_embeds"][0], kw["prompt_embeds"][2])


def test_sd2_plain_prompt_equals_diffusers(infos):
    sd2 = load_sd_model(ck.find_checkpoint(infos, "tiny-sd2"))
    kw = encode_schedule(sd2, "a house on a hill", "blurry", 4, 1).at_step(0)
    pos, neg = sd2.pipe.encode_prompt("a house on a hill", "cpu", 1, True, negative_prompt="blurry")
    assert torch.equal(kw["prompt_embeds"], pos) and torch.equal(kw["negative_prompt_embeds"], neg)
    # SD2's tokenizer pads with "!" after the end token, as A1111's OpenCLIP embedder does
    assert sd2.pipe.tokenizer.pad_token == "!"


def test_emphasis_modes(sd15):
    base = _plain(sd15, "a cat")
    no_norm = encode_schedule(sd15, "a (cat:1.5)", "", 4, 1, emphasis="No norm").at_step(0)["prompt_embeds"]
    (chunk,) = chunk_prompt(sd15.pipe, sd15.pipe.tokenizer, "a (cat:1.5)")
    weights = torch.ones(77)
    weights[1:1 + len(chunk.weights)] = torch.tensor(chunk.weights)
    assert torch.allclose(no_norm, base * weights.reshape(1, -1, 1), atol=1e-6)
    ignore = encode_schedule(sd15, "a (cat:1.5)", "", 4, 1, emphasis="Ignore").at_step(0)["prompt_embeds"]
    assert torch.equal(ignore, base)
    literal = encode_schedule(sd15, "a (cat:1.5)", "", 4, 1, emphasis="None").at_step(0)["prompt_embeds"]
    assert torch.equal(literal, _plain(sd15, "a (cat:1.5)"))
    with pytest.raises(ValueError, match="emphasis='Loud'.*clip_skip=0"):
        encode_schedule(sd15, "a", "", 4, 1, emphasis="Loud", clip_skip=0)
