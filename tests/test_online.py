"""Online DPO (`lit_dpo.online`) and its judges (`lit_dpo.judges`) on tiny models: pairs from
scores, the judge interface, learning what the judge likes, rounds with a refreshed reference,
resuming, the CLI, DDP with 2 processes, and the sentiment experiment end to end."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import build_model, write_jsonl
from lit_dpo.generation import chat_prompt_ids
from lit_dpo.judges import (
    ImplicitRewardJudge,
    Judge,
    RewardModelJudge,
    describe_judge,
    judge_scores,
)
from lit_dpo.module import DPOModule
from lit_dpo.online import OnlineDPO, best_and_worst, make_pairs
from lit_dpo.reward import implicit_reward

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
PROMPTS = [f"Review film number {i}." for i in range(8)]


def longer(prompts, replies):
    """A hand-made judge: longer replies are better (rarely a tie on a random tiny model)."""
    return [len(r) + r.count("e") / 100 for r in replies]


def fit(module, online, max_steps, tmp_path, ckpt_path=None, callbacks=()):
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=[online, *callbacks],
    )  # fmt: skip
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def adamw(lr):
    return functools.partial(torch.optim.AdamW, lr=lr)


# -- pairs from scores --------------------------------------------------------------------------


def test_best_against_worst_ties_dropped_and_counted():
    """Three prompts, 3 samples each: [0.2, 0.9, -0.5] pairs row 1 (best) with row 2 (worst);
    [0.4, 0.4, 0.4] is a tie; [1, 3, 3] takes the first of the two best (row 7) against row 6.
    With min_gap 1.5 the first prompt's gap (1.4) is a tie too, the third's (2) is not."""
    scores = [0.2, 0.9, -0.5, 0.4, 0.4, 0.4, 1.0, 3.0, 3.0]
    assert best_and_worst(scores, 3) == [(1, 2), None, (7, 6)]
    assert best_and_worst(scores, 3, min_gap=1.5) == [None, None, (7, 6)]
    with pytest.raises(ValueError, match="groups"):
        best_and_worst(scores, 2)

    prompts = [[1, 5]] * 3 + [[1, 6]] * 3 + [[1, 7]] * 3
    replies = [[10], [11, 2], [12], [13], [14], [15], [16], [17, 2], [16]]
    rows, ties = make_pairs(prompts, replies, scores, 3)
    assert ties == 1
    assert rows == [
        {"prompt_input_ids": [1, 5], "chosen_input_ids": [11, 2], "rejected_input_ids": [12],
         "chosen_score": 0.9, "rejected_score": -0.5},
        {"prompt_input_ids": [1, 7], "chosen_input_ids": [17, 2], "rejected_input_ids": [16],
         "chosen_score": 3.0, "rejected_score": 1.0},
    ]  # fmt: skip
    # A best and a worst reply of the very same tokens teach nothing: a tie as well.
    same = [[10], [10], [12], [13], [14], [15], [16], [17], [16]]
    rows, ties = make_pairs(prompts, same, [0.0, 1.0, 0.5, 0, 0, 0, 1.0, 3.0, 3.0], 3)
    assert ties == 2 and [r["chosen_input_ids"] for r in rows] == [[17]]


# -- judges ------------------------------------------------------------------------------------


def test_judge_interface_with_a_hand_made_judge():
    class Exclaims(Judge):
        def __call__(self, prompts, replies):
            return [
                r.count("!") - 0.5 * (p == "calm") for p, r in zip(prompts, replies, strict=True)
            ]

    assert judge_scores(Exclaims(), ["calm", "x"], ["wow!!", "no"]) == [1.5, 0.0]
    assert describe_judge(Exclaims()).endswith("Exclaims")
    assert describe_judge(longer) == "longer"  # a plain function is a judge as well
    assert judge_scores(lambda p, r: torch.tensor([0.5, -1]), ["a", "b"], ["c", "d"]) == [0.5, -1]
    with pytest.raises(ValueError, match="gave 1 scores for 2 replies"):
        judge_scores(lambda p, r: [1.0], ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="non-finite score .nan. to reply 1: 'd'"):
        judge_scores(lambda p, r: [1.0, float("nan")], ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="2 prompts but 1 replies"):
        judge_scores(longer, ["a", "b"], ["c"])


def test_reward_model_and_implicit_reward_judges(tokenizer):
    """Each judge gives what its model gives for the same (prompt, reply): RewardModule.score,
    a sequence classifier's logit (computed row by row, unpadded), implicit_reward."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from lit_dpo.reward_model import RewardModule

    prompts, replies = ["Review the film.", "What did you think?"], ["A delight!", "boring"]
    rm = RewardModule(build_model(len(tokenizer), seed=0))
    rm.configure_model()
    torch.nn.init.normal_(rm.head.weight)
    for chat in (False, True):
        asked = [[{"role": "user", "content": p}] for p in prompts] if chat else prompts
        want = rm.score(asked, replies, tokenizer).tolist()
        got = RewardModelJudge(rm, tokenizer, chat=chat)(prompts, replies)
        assert got == pytest.approx(want, abs=1e-6)

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    classifier = LlamaForSequenceClassification(config).eval()
    judge = RewardModelJudge(classifier, tokenizer, chat=False)
    with torch.no_grad():
        want = [classifier(**tokenizer(p, r, return_tensors="pt")).logits[0, 0].item()
                for p, r in zip(prompts, replies, strict=True)]  # fmt: skip
    assert judge(prompts, replies) == pytest.approx(want, abs=1e-5)
    assert judge.describe().startswith("RewardModelJudge(<LlamaForSequenceClassification")
    two = LlamaForSequenceClassification(config.__class__(**config.to_dict() | {"num_labels": 2}))
    with pytest.raises(ValueError, match="2 logits per sequence: say which"):
        RewardModelJudge(two, tokenizer)(prompts, replies)

    policy, reference = build_model(len(tokenizer), seed=2), build_model(len(tokenizer), seed=3)
    judge = ImplicitRewardJudge(policy, reference, tokenizer, beta=0.5)
    messages = [[{"role": "user", "content": p}] for p in prompts]
    want = implicit_reward(policy, reference, tokenizer, messages, replies, 0.5).tolist()
    assert judge(prompts, replies) == pytest.approx(want, abs=1e-6)


# -- online rounds -----------------------------------------------------------------------------


@pytest.fixture
def movie_model_dir(tokenizer, tmp_path):
    """A tiny Llama that says " movie" about 8% of the time whatever the context: every
    embedding carries 1 in dimension 0, so the final hidden state has a large constant
    component there, which the LM-head row of " movie" reads."""
    model = build_model(len(tokenizer), seed=0)
    movie = tokenizer.convert_tokens_to_ids("Ġmovie")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[movie, 0] = 0.6
    model.save_pretrained(tmp_path / "movie")
    tokenizer.save_pretrained(tmp_path / "movie")
    return str(tmp_path / "movie")


def p_movie(model, tokenizer) -> float:
    """The mean probability of " movie" as the first token of a reply to PROMPTS."""
    movie = tokenizer.convert_tokens_to_ids("Ġmovie")
    with torch.no_grad():
        probs = [
            model(torch.tensor([ids])).logits[0, -1].softmax(-1)[movie].item()
            for ids in chat_prompt_ids(tokenizer, PROMPTS)
        ]
    return sum(probs) / len(probs)


def test_online_steps_raise_what_the_judge_likes(movie_model_dir, tokenizer, tmp_path):
    """Judged by how often a reply says "movie", 8 fully online steps raise the policy's
    probability of " movie" (by about 2.5x with these settings) and the judge's mean score."""
    from transformers import AutoModelForCausalLM

    before = p_movie(AutoModelForCausalLM.from_pretrained(movie_model_dir), tokenizer)
    module = DPOModule(movie_model_dir, optimizer=adamw(1e-2), lr_scheduler=None)
    online = OnlineDPO(lambda p, r: [x.count("movie") for x in r], prompts=PROMPTS,
                       n_samples=4, max_new_tokens=8, batch_size=2)  # fmt: skip
    trainer = fit(module, online, 8, tmp_path)
    assert p_movie(module.policy, tokenizer) > 1.5 * before
    rounds = online.rounds
    assert [r["round"] for r in rounds] == [r["step"] for r in rounds] == list(range(8))
    assert rounds[0]["kl"] == 0.0  # the policy is its reference, then moves off it
    assert all(r["kl"] != 0 for r in rounds[1:])
    first, last = rounds[0]["score"] + rounds[1]["score"], rounds[-1]["score"] + rounds[-2]["score"]
    assert last > first
    assert all(r["pairs"] + r["ties"] >= 2 for r in rounds)  # 2 prompts a round, some resampled
    logged = trainer.callback_metrics
    for key in ("score", "score_chosen", "score_rejected", "pairs", "ties", "kl", "round"):
        assert f"online/{key}" in logged
    assert "train/loss" in logged and "train/rewards/accuracies" in logged


def test_rounds_refresh_and_resume(tiny_model_dir, tmp_path):
    """sync_every 2 with refresh_reference: rounds at steps 0 and 2, each of 2 batches x 2 pairs,
    the reference the policy of step 2 from then on. Resumed from the step-2 checkpoint (a round's
    start) the run ends with the same weights; from step 3 (mid-round) the rest of round 1 is
    sampled anew for its last batch's prompts; other settings are refused."""

    def run(ckpt_path=None, callbacks=(), **kwargs):
        L.seed_everything(0)
        module = DPOModule(tiny_model_dir, optimizer=adamw(1e-3), lr_scheduler=None)
        settings = dict(prompts=PROMPTS, sync_every=2, refresh_reference=True, n_samples=2,
                        max_new_tokens=6, batch_size=2) | kwargs  # fmt: skip
        online = OnlineDPO(longer, **settings)
        fit(module, online, 4, tmp_path, ckpt_path, callbacks)
        return module, online

    class AtStep2(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            if trainer.global_step == 2:
                self.policy = {k: v.clone() for k, v in module.policy.state_dict().items()}

    at_step2 = AtStep2()
    every_step = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                 filename="{step}")  # fmt: skip
    module, online = run(callbacks=[every_step, at_step2])
    assert [(r["round"], r["step"], len(r["prompts"])) for r in online.rounds] == [
        (0, 0, 4),
        (1, 2, 4),
    ]
    assert set(online.rounds[0]["prompts"]).isdisjoint(online.rounds[1]["prompts"])
    # Saved after step 2, before round 1 began: no refresh yet, the reference is rebuilt.
    assert "reference" not in torch.load(tmp_path / "ckpt/step=2.ckpt")["lit_dpo_online"]
    saved = torch.load(tmp_path / "ckpt/step=3.ckpt")["lit_dpo_online"]["reference"]
    reference = module.reference.state_dict()
    for k, v in at_step2.policy.items():  # round 1's reference: the policy after 2 steps
        assert torch.equal(saved[k], v) and torch.equal(reference[k], v), k

    resumed, again = run(tmp_path / "ckpt/step=2.ckpt")
    assert [r["round"] for r in again.rounds] == [1]
    assert again.rounds[0]["prompts"] == online.rounds[1]["prompts"]
    assert again.rounds[0]["score"] == online.rounds[1]["score"]
    for k, v in module.policy.state_dict().items():
        assert torch.equal(resumed.policy.state_dict()[k], v), k
    for k, v in reference.items():
        assert torch.equal(resumed.reference.state_dict()[k], v), k

    _, mid = run(tmp_path / "ckpt/step=3.ckpt")
    assert [(r["round"], r["step"]) for r in mid.rounds] == [(1, 3)]
    assert mid.rounds[0]["prompts"] == online.rounds[1]["prompts"][2:]

    with pytest.raises(ValueError, match="n_samples=2, this run has n_samples=3"):
        run(tmp_path / "ckpt/step=2.ckpt", n_samples=3)

    # Without the callback the run would go on offline from online weights: refused.
    import datasets

    from lit_dpo.data import PreferenceDataModule

    rows = [{"prompt": p, "chosen": " yes", "rejected": " no"} for p in PROMPTS]
    data = PreferenceDataModule(datasets.Dataset.from_list(rows), tokenizer=tiny_model_dir,
                                batch_size=2, val_fraction=0)  # fmt: skip
    offline = DPOModule(tiny_model_dir, optimizer=adamw(1e-3), lr_scheduler=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(ValueError, match="^the checkpoint was trained online"):
        trainer.fit(offline, data, ckpt_path=tmp_path / "ckpt/step=2.ckpt")


def test_refused_where_it_cannot_be_right(tiny_model_dir, tmp_path):
    def refused(module, match, **kwargs):
        with pytest.raises(ValueError, match=match):
            fit(module, OnlineDPO(longer, prompts=PROMPTS, **kwargs), 1, tmp_path)

    precomputed = DPOModule(tiny_model_dir, reference="precomputed")
    refused(precomputed, "cannot use reference='precomputed'")
    refused(DPOModule(tiny_model_dir, reference_free=True), "which reference='none'",
            refresh_reference=True)  # fmt: skip
    from lit_dpo.sft import SFTModule

    refused(SFTModule(tiny_model_dir), "trains a DPOModule, not a SFTModule")
    with pytest.raises(ValueError, match="at least 2"):
        OnlineDPO(longer, n_samples=1)
    tied = OnlineDPO(lambda p, r: [0.0] * len(r), prompts=PROMPTS, n_samples=2, max_attempts=2)
    with pytest.raises(ValueError, match="tied under the judge .* in 2 attempts"):
        fit(DPOModule(tiny_model_dir), tied, 1, tmp_path)


def test_cli_fit_online_with_the_prompts_of_the_data(tiny_model_dir, tiny_ref_dir, tmp_path):
    """`lit-dpo fit` with OnlineDPO under trainer.callbacks (the judge by class_path): the
    prompts are the data's train prompts; the online and the DPO metrics reach metrics.csv,
    validation runs on the data's pairs."""
    from lit_dpo.cli import main

    rows = [{"prompt": f"Review film {i}:", "chosen": " a delight.", "rejected": " boring."}
            for i in range(12)]  # fmt: skip
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    online = tmp_path / "online.yaml"
    online.write_text(
        "trainer:\n  callbacks:\n    - class_path: lit_dpo.online.OnlineDPO\n      init_args:\n"
        "        judge:\n          class_path: lit_dpo.judges.ImplicitRewardJudge\n"
        f"          init_args: {{policy: {tiny_model_dir}, reference: {tiny_ref_dir}}}\n"
        "        n_samples: 2\n        max_new_tokens: 6\n        sync_every: 2\n"
    )
    main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(online),
          "--model.model_name_or_path", tiny_model_dir, "--data.dataset", data,
          "--data.val_fraction", "0.25", "--trainer.default_root_dir", str(tmp_path / "run"),
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"online/score", "online/pairs", "online/kl", "train/loss", "val/loss"} <= set(header)


def test_ddp_each_rank_samples_its_own_prompts(tiny_model_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "online_ddp.py"), tiny_model_dir, str(tmp_path)],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r0, r1 in zip(ranks[0]["rounds"], ranks[1]["rounds"], strict=True):
        assert r0["round"] == r1["round"] and len(r0["prompts"]) == len(r1["prompts"]) == 4
    # Each rank passes over a shard of its own: 6 of the 12 prompts, 8 of them sampled.
    seen = [{p for r in rank["rounds"] for p in r["prompts"]} for rank in ranks]
    assert seen[0].isdisjoint(seen[1]) and len(seen[0]) == len(seen[1]) == 6
    assert [r["step"] for r in ranks[0]["rounds"]] == [0, 2]
    for name, value in ranks[0]["policy"].items():
        assert torch.equal(ranks[1]["policy"][name], value), name
    metrics = [r["metrics"] for r in ranks]
    assert metrics[0] == metrics[1]  # synced: one value for the whole run
    assert metrics[0]["online/pairs"] == sum(r["rounds"][-1]["pairs"] for r in ranks)


def test_the_sentiment_experiment_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    """Every method's points, the CSV and the plot; a rerun recomputes only a missing point.
    The tiny model's replies are not words, so a hand-made score stands in for VADER's."""
    import experiments.sentiment.judge
    from experiments.sentiment import online

    monkeypatch.setattr(experiments.sentiment.judge, "score", lambda texts: longer(texts, texts))
    messages = [
        {"prompt": [{"role": "user", "content": f"Review film {i}."}],
         "chosen": [{"role": "assistant", "content": "A delight."}],
         "rejected": [{"role": "assistant", "content": "Boring."}]}
        for i in range(6)
    ]  # fmt: skip
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        write_jsonl(data / f"{split}.jsonl", messages)
    args = ["--model", tiny_model_dir, "--data", str(data), "--out", str(tmp_path / "out"),
            "--runs", str(tmp_path / "runs"), "--smoke"]  # fmt: skip
    online.main(args)
    table = (tmp_path / "out/sentiment_online.csv").read_text().splitlines()
    methods = {line.split(",")[1] for line in table[1:]}
    assert methods == {"reference", "best-of-N (VADER)", "Preferred-FT", "DPO", "online DPO",
                       "semi-online DPO", "iterative DPO"}  # fmt: skip
    assert (tmp_path / "out/sentiment_online.png").stat().st_size > 0
    points = tmp_path / "out/sentiment_online"
    rounds = json.loads((points / "rounds/iterative_sync1.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["kl"] != 0  # off its reference
    kept = {p.name: p.stat().st_mtime_ns for p in points.glob("*.json")}
    (points / "semi_online_sync2_step2.json").unlink()
    online.main(args)
    assert (points / "semi_online_sync2_step2.json").exists()
    for name, mtime in kept.items():
        if name != "semi_online_sync2_step2.json":
            assert (points / name).stat().st_mtime_ns == mtime, name
