"""Captioning, VQA and zero-shot classification metrics, reproducing the reference implementations.

- ``bleu4``: corpus BLEU-4 as pycocoevalcap's ``Bleu(4)`` (``option="closest"``) and NLTK's ``corpus_bleu``.
- ``cider_d``: CIDEr-D as ``CiderD`` of vrama91/cider (``df_mode="corpus"``), which is also what pycocoevalcap's
  ``Cider`` class computes.
- ``vqa_accuracy``: the answer normalisation of the official VQA evaluation script (GT-Vision-Lab/VQA ``vqaEval.py``)
  with the VQA v2 formula min(#matches / 3, 1).
- ``zero_shot_accuracy``: CLIP's zero-shot classification (Radford et al. 2021) with prompt-ensembled class embeddings.

Captions are tokenised by ``tokenize`` rather than by the PTB tokenizer that coco-caption runs through Java, so scores
match the references on text that both tokenise the same way (lowercase words without punctuation). Corpus-level
inputs are parallel lists: ``hypotheses[i]`` is the generated caption of image i and ``references[i]`` its human
captions.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import torch

_NON_WORD = re.compile(r"[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Lowercase ``text``, delete every character that is not a letter, digit or whitespace, and split on whitespace.

    Punctuation is deleted, not replaced by a space: ``"Don't"`` -> ``["dont"]``, ``"black-and-white"`` ->
    ``["blackandwhite"]``, ``"A man, riding."`` -> ``["a", "man", "riding"]``. This is the tokeniser of ``bleu4`` and
    ``cider_d``; ``vqa_accuracy`` uses the VQA script's own normalisation (``normalize_vqa_answer``) instead.
    """
    return _NON_WORD.sub("", text.lower()).split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of the n-grams of one order ``n`` in ``tokens``."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _check_corpus(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise ValueError unless there is one hypothesis per image, at least one image, and references for each."""
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("empty corpus: no hypotheses")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")


# ----------------------------------------------------------------------------------------------------------- BLEU


def bleu4(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus-level BLEU-4 (Papineni et al. 2002) as pycocoevalcap ``Bleu(4)`` and NLTK ``corpus_bleu`` compute it.

    With each caption split by ``tokenize``, and summing over the corpus:

    - p_n = sum of clipped n-gram matches / sum of hypothesis n-grams, for n = 1..4. An n-gram's count in a
      hypothesis is clipped to its largest count in any single reference of that image.
    - c = total hypothesis length; r = total of the "closest" reference lengths: for each image, the reference
      length nearest the hypothesis length, the shorter one on a tie (pycocoevalcap ``option="closest"``,
      NLTK ``closest_ref_length``).
    - BP = 1 if c >= r, else exp(1 - r / c).
    - BLEU-4 = BP * (p_1 * p_2 * p_3 * p_4) ** (1 / 4), the uniform-weight geometric mean.

    No smoothing: if some order has no match at all in the corpus, or the corpus has no 4-gram, the score is exactly
    0.0, as NLTK returns (pycocoevalcap adds 1e-15 / 1e-9 guards instead and returns a tiny positive number).
    A hypothesis shorter than n tokens contributes no n-gram, as in pycocoevalcap; NLTK differs only there, by
    counting max(1, #n-grams) per sentence in the denominator.

    Returns a value in [0, 1].
    """
    _check_corpus(hypotheses, references)
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        h = tokenize(hyp)
        ref_tokens = [tokenize(r) for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in ref_tokens)[1]   # closest, shorter on ties
        for n in range(1, 5):
            counts = _ngrams(h, n)
            max_ref: Counter[tuple[str, ...]] = Counter()
            for r in ref_tokens:
                max_ref |= _ngrams(r, n)                                          # union = elementwise max
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += max(0, len(h) - n + 1)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


# ---------------------------------------------------------------------------------------------------------- CIDEr-D


def _all_ngrams(tokens: Sequence[str]) -> Counter[tuple[str, ...]]:
    """Counts of all n-grams of orders 1..4 in ``tokens``."""
    out: Counter[tuple[str, ...]] = Counter()
    for n in range(1, 5):
        out.update(_ngrams(tokens, n))
    return out


def _tfidf(counts: Counter[tuple[str, ...]], log_df: dict[tuple[str, ...], float], log_images: float
           ) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
    """TF-IDF vectors (one per order 1..4), their L2 norms, and the caption 'length' used by the length penalty.

    The length is the caption's bigram count, as in the reference ``counts2vec`` (its ``if n == 1`` tests the
    0-based order index): tokens - 1 for a non-empty caption.
    """
    vecs: list[dict[tuple[str, ...], float]] = [{} for _ in range(4)]
    for gram, tf in counts.items():
        vecs[len(gram) - 1][gram] = tf * (log_images - log_df.get(gram, 0.0))
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vecs, norms, length


def cider_d(hypotheses: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015) as ``CiderD`` of vrama91/cider computes it with ``df_mode="corpus"``.

    With each caption split by ``tokenize`` into n-grams of orders n = 1..4, and N = number of images:

    - Document frequency df(g) = number of images whose references (any of them) contain n-gram g. Only the
      references of this corpus count, never the hypotheses.
    - A caption's vector for order n maps each of its n-grams g to tf(g) * (log N - log(max(1, df(g)))), tf being
      the count in that caption. An n-gram absent from all references gets weight tf * log N.
    - For a hypothesis h and one reference r, order n contributes
      sum_g min(h_g, r_g) * r_g / (|h_n| * |r_n|) * exp(-(len_h - len_r)^2 / (2 sigma^2)),
      taken as 0 when either norm is 0 (a caption with no n-gram of that order, or only n-grams found in every
      image's references). len is the caption's bigram count, i.e. tokens - 1 for a non-empty caption, exactly
      like the reference code.
    - An image scores 10 * (mean over n of the sum over its references) / (number of references); the corpus scores
      the mean over images.

    CIDEr-D versus plain CIDEr (vrama91's ``Cider``): the min() clips the hypothesis weights to the reference's
    (a repeated word cannot earn more than the reference has), and the Gaussian length penalty applies; plain CIDEr
    has neither. pycocoevalcap's class named ``Cider`` in fact computes this CIDEr-D (cross-checked against
    pycocoevalcap 1.2; the older tylin/coco-caption copy lacks the zero-norm guard and returns NaN there).
    Identical captions score 10 only if they have 4-grams; a 2-token caption matching its only reference scores 5.
    """
    _check_corpus(hypotheses, references)
    hyp_counts = [_all_ngrams(tokenize(h)) for h in hypotheses]
    ref_counts = [[_all_ngrams(tokenize(r)) for r in refs] for refs in references]
    df: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        df.update(set().union(*refs))
    log_df = {g: math.log(d) for g, d in df.items()}                               # log(max(1, df)), df >= 1 here
    log_images = math.log(len(references))

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        h_vecs, h_norms, h_len = _tfidf(hyp, log_df, log_images)
        total = 0.0
        for ref in refs:
            r_vecs, r_norms, r_len = _tfidf(ref, log_df, log_images)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma ** 2))
            for hv, rv, hn, rn in zip(h_vecs, r_vecs, h_norms, r_norms):
                if hn != 0 and rn != 0:
                    dot = sum(min(w, rv.get(g, 0.0)) * rv.get(g, 0.0) for g, w in hv.items())
                    total += dot / (hn * rn) * penalty
        scores.append(10.0 * total / 4 / len(refs))
    return sum(scores) / len(scores)


# -------------------------------------------------------------------------------------------------------------- VQA

_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_VQA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_VQA_PERIOD = re.compile(r"\.(?!\d)")


def normalize_vqa_answer(answer: str) -> str:
    """An answer normalised as the official VQA evaluation script (``vqaEval.py``) processes a predicted answer.

    In order: newlines and tabs become spaces and the ends are stripped; each mark of
    ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted if it touches a space somewhere in the answer or the
    answer contains a digit-comma-digit ("1,000"), and replaced by a space otherwise (``processPunctuation``);
    a period not followed by a digit is deleted ("3.5" keeps its); the text is lowercased and split on whitespace;
    number words none/zero..ten become digits; the articles a, an, the are dropped; the words are joined by single
    spaces (``processDigitArticle``). The script's contraction table ("dont" -> "don't") is not applied, and the
    apostrophe is kept, so "dont" and "don't" stay different answers.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        if p + " " in text or " " + p in text or _VQA_DIGIT_COMMA.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _VQA_PERIOD.sub("", out)
    words = [_VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(w for w in words if w not in _VQA_ARTICLES)


def vqa_accuracy(predictions: list[str], answers: list[str | list[str]]) -> float:
    """Mean VQA accuracy of ``predictions`` against ``answers``, after ``normalize_vqa_answer`` on both sides.

    ``answers[i]`` is either one ground-truth string, scored by exact match (1 or 0), or the list of human answers
    of question i (10 in VQA v2), scored min(#human answers equal to the prediction / 3, 1): 1 match -> 1/3,
    2 -> 2/3, 3 or more -> 1. This is the simple form of the VQA v2 metric; the official script averages that
    formula over the 10 leave-one-out subsets of 9 answers, which gives slightly different values (e.g. 0.9 rather
    than 1 for 3 matches). Unlike the script, the human answers get the full normalisation too (the script only
    strips their punctuation, relying on the dataset's answers being normalised already). A one-element list is
    still scored by the formula (at most 1/3); pass a string for exact match.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions but {len(answers)} answers")
    if not predictions:
        raise ValueError("no predictions to score")
    total = 0.0
    for pred, gt in zip(predictions, answers):
        p = normalize_vqa_answer(pred)
        if isinstance(gt, str):
            total += float(p == normalize_vqa_answer(gt))
        else:
            total += min(sum(p == normalize_vqa_answer(a) for a in gt) / 3, 1.0)
    return total / len(predictions)


# -------------------------------------------------------------------------------------------------------- zero-shot


def class_embeddings(class_text_embeds: torch.Tensor) -> torch.Tensor:
    """Unit class embeddings (C, E) from per-template text embeddings (C, T, E) or one embedding per class (C, E).

    As CLIP's zero-shot prompt ensembling: normalise each template embedding, average over the T templates,
    normalise again.
    """
    emb = class_text_embeds.float()
    if emb.dim() == 2:
        emb = emb.unsqueeze(1)                                                     # (C, 1, E)
    if emb.dim() != 3:
        raise ValueError(f"class_text_embeds must be (C, T, E) or (C, E), got shape {tuple(class_text_embeds.shape)}")
    emb = torch.nn.functional.normalize(emb, dim=-1).mean(dim=1)                   # (C, E)
    return torch.nn.functional.normalize(emb, dim=-1)


def zero_shot_accuracy(image_embeds: torch.Tensor, class_text_embeds: torch.Tensor,
                       labels: torch.Tensor | Sequence[int]) -> dict[str, float]:
    """Top-1 zero-shot classification accuracy (Radford et al. 2021, CLIP) of N images over C classes.

    Each image (N, E) is assigned the class whose ``class_embeddings`` has the highest cosine similarity with it
    (the first such class on a tie). Returns ``zero_shot_acc`` (fraction of images whose assigned class equals
    ``labels``), ``zero_shot_chance`` = 1 / C (a uniformly random guess; not the majority-class rate) and
    ``zero_shot_classes`` = C.
    """
    classes = class_embeddings(class_text_embeds)                                  # (C, E)
    images = torch.nn.functional.normalize(image_embeds.float(), dim=-1)           # (N, E)
    target = torch.as_tensor(labels, dtype=torch.long).reshape(-1)                 # (N,)
    if images.dim() != 2 or images.shape[0] != target.shape[0] or images.shape[1] != classes.shape[1]:
        raise ValueError(f"image_embeds {tuple(image_embeds.shape)}, labels ({target.shape[0]},) and class "
                         f"embeddings {tuple(classes.shape)} do not fit (N, E), (N,), (C, E)")
    if target.numel() == 0:
        raise ValueError("no images to classify")
    num_classes = classes.shape[0]
    if target.min() < 0 or target.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{target.min()}, {target.max()}]")
    pred = (images @ classes.T).argmax(dim=1)                                      # (N,)
    return {"zero_shot_acc": (pred == target).float().mean().item(),
            "zero_shot_chance": 1.0 / num_classes,
            "zero_shot_classes": num_classes}
