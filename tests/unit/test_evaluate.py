"""mmray.eval.evaluate on real (untrained) models and real pipeline batches, without Ray."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from mmray import config
from mmray.data import shapes
from mmray.data.pipeline import DataQuality, Preprocess
from mmray.data.tokenizer import TextTokenizer, train_tokenizer
from mmray.eval import names
from mmray.eval.evaluate import evaluate, special_ids, vqa_metrics
from mmray.models.model import MultimodalModel

N, SIZE, TEXT = 24, 32, 24


@pytest.fixture(scope="module")
def data():
    samples = [shapes.generate_sample(5, i, SIZE) for i in range(N)]
    texts = [s.caption for s in samples] + [f"{q['question']} {q['answer']}" for s in samples for q in s.qa]
    tokenizer = TextTokenizer(train_tokenizer(texts, 256))
    rows = {"key": [], "shard": [], "image": [], "caption": [], "meta": [], "error": []}
    for i, s in enumerate(samples):
        buf = io.BytesIO()
        s.image.save(buf, "PNG")
        for k, v in (("key", f"{i:04d}"), ("shard", "mem"), ("image", buf.getvalue()), ("caption", s.caption.encode()),
                     ("meta", json.dumps({"objects": s.objects, "qa": s.qa}).encode()), ("error", "")):
            rows[k].append(v)
    quality = DataQuality()
    batch = Preprocess(tokenizer.to_str(), SIZE, TEXT, quality)({k: np.array(v, dtype=object) for k, v in rows.items()})
    assert quality.good == N
    return tokenizer, batch


def _cfg(*overrides):
    return config.load(None, ["model.image_depth=1", "model.text_depth=1", "model.image_width=32", "model.text_width=32",
                              "model.embed_dim=16", "model.patch_size=8", "model.image_heads=2", "model.text_heads=2",
                              f"data.image_size={SIZE}", f"data.max_text_len={TEXT}", *overrides])


def _model(cfg, tokenizer):
    torch.manual_seed(0)
    return MultimodalModel(cfg.model, tokenizer.vocab_size, tokenizer.pad_id, SIZE, TEXT).eval()


def test_every_sample_gets_its_question_and_label(data):
    tokenizer, batch = data
    assert all(q and a for q, a in zip(batch["question"], batch["answer"]))  # every shapes scene has QA pairs
    assert {t for t in batch["qa_type"]} <= {"count", "colour", "shape", "position", "size"}
    bos, eos = special_ids(tokenizer)
    assert (batch["answer_ids"][:, 0] == bos).all() and (batch["question_ids"][:, 0] == bos).all()
    one_object = [i for i, c in enumerate(batch["caption"]) if " left of " not in c and " and " not in c]
    assert one_object and all(batch["label"][i] in shapes.SHAPES for i in one_object)
    assert all(batch["label"][i] == "" for i in range(N) if i not in one_object)


def test_late_with_decoder_reports_retrieval_zero_shot_captions_and_vqa(data):
    tokenizer, batch = data
    cfg = _cfg("model.decoder_depth=1", "model.vqa_weight=1", "eval.max_new_tokens=6")
    m = evaluate(_model(cfg, tokenizer), [batch], tokenizer, cfg)
    assert m["eval_pairs"] == N
    for key in ("i2t_r@1", "t2i_r@10", "chance_r@10", "zero_shot_acc", "caption_loss", "bleu4", "cider_d",
                "vqa_acc", "vqa_acc_count", "vqa_questions"):
        assert key in m, key
    assert m["vqa_questions"] == N
    assert 0 <= m["vqa_acc"] <= 1 and m["zero_shot_classes"] >= 2
    assert m["zero_shot_chance"] == pytest.approx(1 / m["zero_shot_classes"])
    # every name it reports is one the config checks know (sweep.metric, run.keep_best_metric), and the other way
    assert all(names.known(k) for k in m), [k for k in m if not names.known(k)]
    fusing = evaluate(_model(_cfg("model.fusion=early", "eval.generate=false"), tokenizer), [batch], tokenizer,
                      _cfg("model.fusion=early", "eval.generate=false"))
    reported = set(m) | set(fusing) | set(vqa_metrics(["red"], ["red"], ["size"]))
    assert set(names.METRICS) <= reported, set(names.METRICS) - reported


@pytest.mark.parametrize("fusion", ["early", "hierarchical", "attention"])
def test_fusing_strategies_report_itm_and_respect_max_samples(data, fusion):
    tokenizer, batch = data
    cfg = _cfg(f"model.fusion={fusion}", "eval.generate=false")
    halves = [{k: v[:N // 2] for k, v in batch.items()}, {k: v[N // 2:] for k, v in batch.items()}]
    m = evaluate(_model(cfg, tokenizer), halves, tokenizer, cfg, max_samples=N // 2 + 3)
    assert m["eval_pairs"] == N // 2 + 3 and "itm_acc" in m
    assert ("i2t_r@1" in m) == (fusion == "attention")


def test_vqa_metrics_by_type_hand_computed():
    m = vqa_metrics(["red", "2", "no", "circle"], ["red", "two", "yes", "square"],
                    ["colour", "count", "position", "shape"])
    assert m["vqa_acc"] == 0.5 and m["vqa_acc_count"] == 1.0 and m["vqa_acc_colour"] == 1.0
    assert m["vqa_acc_position"] == 0.0 and m["vqa_acc_compositional"] == pytest.approx(1 / 3)
