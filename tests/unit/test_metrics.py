"""Captioning, VQA and zero-shot metrics against values computed by hand (arithmetic in the comments)."""
import math

import pytest
import torch

from mmray.eval.metrics import (bleu4, cider_d, class_embeddings, normalize_vqa_answer, tokenize, vqa_accuracy,
                                zero_shot_accuracy)

LN2 = math.log(2)


def test_tokenize_lowercases_and_deletes_punctuation():
    assert tokenize("A man, riding a Horse.") == ["a", "man", "riding", "a", "horse"]
    assert tokenize("Don't  stop\tthe black-and-white dog_!") == ["dont", "stop", "the", "blackandwhite", "dog"]
    assert tokenize(" ... ") == []


# ----------------------------------------------------------------------------------------------------------- BLEU


def test_bleu_identical_is_one_and_ignores_case_and_punctuation():
    assert bleu4(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    assert bleu4(["The cat sat on the mat."], [["the cat, sat on the mat"]]) == pytest.approx(1.0)


def test_bleu_single_sentence_by_hand():
    # hyp "the cat sat on the mat" (6 tokens) vs ref "the cat sat on a mat" (6 tokens):
    #   1-grams: the x2 clipped to the ref's 1, cat, sat, on, mat        -> 5/6
    #   2-grams: the cat, cat sat, sat on  (not: on the, the mat)        -> 3/5
    #   3-grams: the cat sat, cat sat on                                 -> 2/4
    #   4-grams: the cat sat on                                          -> 1/3
    #   c = r = 6 -> BP = 1;  BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** (1/4)
    assert bleu4(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx((1 / 12) ** 0.25)


def test_bleu_sums_counts_over_the_corpus():
    # sentence 1 as above: matches/totals 5/6, 3/5, 2/4, 1/3, hyp length 6, closest ref length 6.
    # sentence 2: hyp "a dog runs fast" (4) vs ref "a dog runs very fast" (5):
    #   1-grams 4/4; 2-grams a dog, dog runs -> 2/3; 3-grams a dog runs -> 1/2; 4-grams 0/1.
    # corpus: p = 9/10, 5/8, 3/6, 1/4; c = 10, r = 11 -> BP = exp(1 - 11/10) = exp(-0.1).
    # (the mean of sentence BLEUs would be ((1/12) ** (1/4) + 0) / 2 instead)
    hyps = ["the cat sat on the mat", "a dog runs fast"]
    refs = [["the cat sat on a mat"], ["a dog runs very fast"]]
    expected = math.exp(-0.1) * (9 / 10 * 5 / 8 * 3 / 6 * 1 / 4) ** 0.25
    assert bleu4(hyps, refs) == pytest.approx(expected)


def test_bleu_without_a_4gram_match_is_zero():
    # hyp "the cat sat on the mat" vs refs "the cat is on the mat", "there is a cat on the mat":
    # 4-grams of the hyp (the cat sat on / cat sat on the / sat on the mat) are in neither ref -> p4 = 0/3,
    # so BLEU-4 = 0.0 with no smoothing, although p1 = 5/6, p2 = 3/5, p3 = 1/4.
    assert bleu4(["the cat sat on the mat"], [["the cat is on the mat", "there is a cat on the mat"]]) == 0.0
    # a corpus without any 4-gram (3-token hypothesis) is 0.0 too, even when it equals its reference
    assert bleu4(["a b c"], [["a b c"]]) == 0.0


def test_bleu_brevity_penalty_uses_the_closest_reference():
    # hyp "a b c d": every n-gram is in ref "a b c d e f g h", p1..p4 = 1; c = 4, r = 8 -> exp(1 - 8/4) = e^-1
    assert bleu4(["a b c d"], [["a b c d e f g h"]]) == pytest.approx(math.exp(-1))
    # refs of lengths 6 and 3: the closest to 4 is 3 -> c > r -> BP = 1 (precisions are still 1)
    assert bleu4(["a b c d"], [["a b c d e f", "x y z"]]) == pytest.approx(1.0)
    # refs of lengths 3 and 5 are both 1 away: the tie goes to the shorter (3) -> BP = 1, not exp(1 - 5/4)
    assert bleu4(["a b c d"], [["a b c", "a b c d e"]]) == pytest.approx(1.0)
    # a longer hypothesis is never penalised: c = 5 > r = 4, p = 4/5, 3/4, 2/3, 1/2
    assert bleu4(["a b c d x"], [["a b c d"]]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)


def test_bleu_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        bleu4(["a b c d"], [])
    with pytest.raises(ValueError):
        bleu4(["a b c d"], [[]])
    with pytest.raises(ValueError):
        bleu4(["a b c d"], ["a b c d"])  # a bare string instead of a list of references


def test_bleu_matches_nltk_corpus_bleu():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    hyps = ["the cat sat on the mat", "a dog runs fast", "two people ride bikes on a road"]
    refs = [["the cat sat on a mat", "a cat is on the mat"], ["a dog runs very fast", "the dog runs"],
            ["people ride bikes on the road", "two people are riding bicycles down a road"]]
    expected = bleu_score.corpus_bleu([[r.split() for r in rs] for rs in refs], [h.split() for h in hyps])
    assert bleu4(hyps, refs) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------------- CIDEr-D


def test_cider_d_identical_captions_by_hand():
    # 2 images, one reference each: "cat sat" and "dog ran". Every n-gram occurs in one image's references:
    # df = 1 -> weight = tf * (log 2 - log 1) = ln2.  For each image, hyp == ref:
    #   n=1: (ln2*ln2 + ln2*ln2) / (sqrt(2) ln2 * sqrt(2) ln2) = 1;  n=2: ln2^2 / (ln2 * ln2) = 1
    #   n=3, n=4: no n-grams, zero norms -> 0;  length penalty exp(0) = 1
    #   image score = 10 * (1 + 1 + 0 + 0) / 4 / 1 ref = 5.0;  corpus = 5.0
    assert cider_d(["cat sat", "dog ran"], [["cat sat"], ["dog ran"]]) == pytest.approx(5.0)
    # with 4 tokens every order matches: 10 * (1 + 1 + 1 + 1) / 4 = 10
    assert cider_d(["a cat sat down", "dog ran off fast"],
                   [["a cat sat down"], ["dog ran off fast"]]) == pytest.approx(10.0)


def test_cider_d_ngrams_in_every_image_weigh_nothing():
    # refs "red cat" and "red dog": df(red) = 2 -> weight log 2 - log 2 = 0.
    # image 1 hyp "red dog" vs ref "red cat": n=1 hyp {red: 0, dog: ln2}, ref {red: 0, cat: ln2} -> dot 0;
    #   n=2 (red dog) vs (red cat) -> 0; image 1 = 0.
    # image 2 hyp "red dog" == ref: n=1 ln2^2 / (ln2 * ln2) = 1, n=2 = 1 -> 10 * 2 / 4 = 5.  corpus = (0 + 5) / 2
    assert cider_d(["red dog", "red dog"], [["red cat"], ["red dog"]]) == pytest.approx(2.5)


def test_cider_d_clips_repeated_words():
    # image 1 hyp "cat cat" vs ref "cat sat" (image 2 "dog ran" matches itself: 5.0); all df = 1, weight ln2.
    #   n=1: hyp {cat: 2 ln2}, norm 2 ln2; ref {cat: ln2, sat: ln2}, norm sqrt(2) ln2
    #        clipped dot = min(2 ln2, ln2) * ln2 = ln2^2 -> cos = 1 / (2 sqrt 2)   (unclipped: 2 ln2^2 -> 1 / sqrt 2)
    #   n=2: (cat cat) vs (cat sat) -> 0;  lengths 1 bigram each -> no penalty
    #   image 1 = 10 * (1 / (2 sqrt 2)) / 4 = 0.8839;  corpus = (0.8839 + 5) / 2
    image1 = 10 * (1 / (2 * math.sqrt(2))) / 4
    assert cider_d(["cat cat", "dog ran"], [["cat sat"], ["dog ran"]]) == pytest.approx((image1 + 5.0) / 2)


def test_cider_d_gaussian_length_penalty():
    # image 1 hyp "cat sat down" vs ref "cat sat"; "down" is in no reference: df 0 -> weight ln2 like the rest.
    #   n=1: dot 2 ln2^2 / (sqrt(3) ln2 * sqrt(2) ln2) = 2 / sqrt 6
    #   n=2: hyp {cat sat, sat down}, ref {cat sat}: ln2^2 / (sqrt(2) ln2 * ln2) = 1 / sqrt 2
    #   n=3: the ref has no trigram -> 0
    #   lengths (bigram counts) 2 vs 1 -> delta 1 -> penalty exp(-1 / (2 * 6^2)) = exp(-1/72)
    # image 2 "dog ran" == ref -> 5.0
    no_penalty = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
    hyps, refs = ["cat sat down", "dog ran"], [["cat sat"], ["dog ran"]]
    assert cider_d(hyps, refs) == pytest.approx((no_penalty * math.exp(-1 / 72) + 5.0) / 2)
    assert cider_d(hyps, refs, sigma=1.0) == pytest.approx((no_penalty * math.exp(-1 / 2) + 5.0) / 2)
    assert cider_d(hyps, refs, sigma=1e9) == pytest.approx((no_penalty + 5.0) / 2)


def test_cider_d_document_frequency_counts_images_and_scores_average_over_references():
    # image 1 refs "cat sat", "kitten sat" (hyp "cat sat"); image 2 ref "dog ran" (hyp "dog ran").
    # "sat" is in two references of ONE image: df(sat) = 1, so every n-gram weighs ln2.
    #   vs "cat sat": n=1 1, n=2 1;  vs "kitten sat": n=1 ln2^2 / (sqrt(2) ln2)^2 = 1/2, n=2 0
    #   image 1 = 10 * ((1 + 1/2) + 1 + 0 + 0) / 4 / 2 refs = 3.125;  image 2 = 5.0;  corpus = 4.0625
    # (counting df per reference would give df(sat) = 2, weight 0, and image 1 = 2.5)
    assert cider_d(["cat sat", "dog ran"], [["cat sat", "kitten sat"], ["dog ran"]]) == pytest.approx(4.0625)


def test_cider_d_single_image_corpus_is_zero():
    # N = 1: every reference n-gram has weight log 1 - log 1 = 0, so all reference norms are 0 -> 0.0
    assert cider_d(["a cat sat down"], [["a cat sat down"]]) == 0.0


def test_cider_d_matches_pycocoevalcap():
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    hyps = ["the cat sat on the mat", "a dog runs fast", "two people ride bikes on a road"]
    refs = [["the cat sat on a mat", "a cat is on the mat"], ["a dog runs very fast", "the dog runs"],
            ["people ride bikes on the road", "two people are riding bicycles down a road"]]
    expected, _ = cider.Cider().compute_score({i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
    assert cider_d(hyps, refs) == pytest.approx(expected)


# -------------------------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"), ("the circle.", "circle"), ("  An   Apple\t", "apple"), ("none", "0"),
    ("3.5", "3.5"), ("1,000", "1000"), ("red,blue", "red blue"), ("red, blue", "red blue"), ("yes!", "yes"),
    ("don't", "don't"),
])
def test_vqa_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_exact_match_after_normalisation():
    assert vqa_accuracy(["Two"], ["2"]) == 1.0
    assert vqa_accuracy(["the circle."], ["circle"]) == 1.0
    assert vqa_accuracy(["yes"], ["no"]) == 0.0
    assert vqa_accuracy(["Two", "yes", "the circle.", "blue"], ["2", "no", "circle", "red"]) == pytest.approx(0.5)


def test_vqa_ten_answer_formula():
    humans = ["2", "2", "3", "3", "3", "4", "4", "4", "4", "many"]
    assert vqa_accuracy(["two"], [humans]) == pytest.approx(2 / 3)   # 2 matches -> 2/3
    assert vqa_accuracy(["many"], [humans]) == pytest.approx(1 / 3)  # 1 match
    assert vqa_accuracy(["3"], [humans]) == 1.0                      # 3 matches -> min(3/3, 1)
    assert vqa_accuracy(["four"], [humans]) == 1.0                   # 4 matches, capped at 1
    assert vqa_accuracy(["5"], [humans]) == 0.0
    assert vqa_accuracy(["two", "5"], [humans, "5"]) == pytest.approx((2 / 3 + 1) / 2)  # lists and strings mix


def test_vqa_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        vqa_accuracy(["yes"], [])


# -------------------------------------------------------------------------------------------------------- zero-shot

# class 0 templates (100, 0, 0) and (0, 1, 0): normalised, averaged, renormalised -> (1, 1, 0) / sqrt 2.
#   (a raw mean, (50, 0.5, 0), would point almost along x)
# class 1 templates (1, 0, 0) twice -> (1, 0, 0);  class 2 templates (0, 0, 1), (0, 0, 2) -> (0, 0, 1)
TEMPLATES = torch.tensor([[[100.0, 0, 0], [0, 1, 0]], [[1, 0, 0], [1, 0, 0]], [[0, 0, 1], [0, 0, 2]]])  # (C, T, E)
# image (1, 0.3, 0): cos with class 0 ~ 1.3 / sqrt 2 = 0.92 < with class 1 ~ 1 -> class 1 (a raw mean says class 0)
# image (0.2, 1, 0): class 0 ~ 1.2 / sqrt 2 = 0.85 > class 1 ~ 0.2 -> class 0;  image (0.1, 0, 3) -> class 2
IMAGES = torch.tensor([[1.0, 0.3, 0], [0.2, 1, 0], [0.1, 0, 3]])


def test_class_embeddings_normalise_each_template_before_averaging():
    expected = torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2), 0], [1.0, 0, 0], [0, 0, 1.0]])
    assert torch.allclose(class_embeddings(TEMPLATES), expected, atol=1e-6)
    assert torch.allclose(class_embeddings(TEMPLATES[:, 1] * 5), torch.eye(3)[[1, 0, 2]])  # (C, E) input


def test_zero_shot_accuracy_on_constructed_embeddings():
    out = zero_shot_accuracy(IMAGES * 7, TEMPLATES, [1, 0, 2])  # image scale does not matter
    assert out == {"zero_shot_acc": 1.0, "zero_shot_chance": pytest.approx(1 / 3), "zero_shot_classes": 3}
    assert zero_shot_accuracy(IMAGES, TEMPLATES, torch.tensor([1, 0, 0]))["zero_shot_acc"] == pytest.approx(2 / 3)
    # one embedding per class (C, E): class 0 is (0, 1, 0), so image 0 still goes to class 1 and image 1 to class 0
    assert zero_shot_accuracy(IMAGES, TEMPLATES[:, 1], [1, 0, 2])["zero_shot_acc"] == 1.0


def test_zero_shot_rejects_bad_shapes_and_labels():
    with pytest.raises(ValueError):
        zero_shot_accuracy(IMAGES, TEMPLATES, [1, 0])
    with pytest.raises(ValueError):
        zero_shot_accuracy(IMAGES, TEMPLATES, [1, 0, 3])
    with pytest.raises(ValueError):
        zero_shot_accuracy(IMAGES[:, :2], TEMPLATES, [1, 0, 2])
