"""Online, semi-online and iterative DPO: the policy makes its own pairs, a judge ranks them.

`OnlineDPO` is a callback that turns a DPOModule run into online DPO, in `lit-dpo fit` (under
`trainer.callbacks`) or in your own Trainer. Every `sync_every` optimizer steps (a *round*),
each rank:

1. takes the next prompts of its own shard of them (the ranks' shards are disjoint; each is
   passed over again and again, each pass in a seeded order);
2. samples `n_samples` replies to each from the current policy (eval mode, no grad);
3. estimates KL(pi || pi_ref) on them: the mean of log pi(y|x) - log pi_ref(y|x);
4. with `refresh_reference`, from the second round on, copies the policy's weights into the
   reference (iterative DPO: each round trains against the policy that began it);
5. has the judge score every reply and pairs each prompt's best reply (chosen) with its worst
   (rejected); a prompt whose replies tie is dropped and counted.

The round's batches are made of its pairs, and DPOModule trains on them as on any (its loss and
metrics unchanged). `sync_every: 1` is fully online; a few steps, semi-online (Lanchantin et al.
2025, arXiv 2506.21495); many, with `refresh_reference`, iterative DPO in offline rounds.

No new trainer: the callback gives the data module (or, without one, the LightningModule) a
train loader that only paces the steps, and fills each batch in `on_train_batch_start`, right
before the training step (a loader that sampled would use the policy of a step before: Lightning
fetches the next batch early).

Resuming: a checkpoint records the settings (others are refused) and a refreshed reference. At
a round's start it is exact (a round's prompts and seeds follow from seed, round and rank); mid-
round, the rest of the round is sampled anew from the restored policy (docs/online.md).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections.abc import Sequence

import lightning as L
import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lit_dpo import samples
from lit_dpo.data import collate_pairs
from lit_dpo.export import policy_tokenizer
from lit_dpo.generation import Sampling, decode, generate_ids
from lit_dpo.hub import has_adapters
from lit_dpo.judges import Judge, JudgeFn, describe_judge, judge_scores
from lit_dpo.module import ONLINE_KEY
from lit_dpo.reward import log_ratios
from lit_dpo.utils import pad_token_id

PLACEHOLDER = "online_batch"  # the key of the pacing loader's batches, replaced by pairs
CHECKPOINT_KEY = ONLINE_KEY


def best_and_worst(
    scores: Sequence[float], n_samples: int, min_gap: float = 0.0
) -> list[tuple[int, int] | None]:
    """Per prompt, of its `n_samples` scores (prompt-major, as `generate_ids` returns samples):
    (the row of its best-scored sample, the row of its worst), the first of equals each, or None
    for a tie: best - worst <= min_gap."""
    if n_samples < 2 or len(scores) % n_samples:
        raise ValueError(f"{len(scores)} scores are not groups of n_samples={n_samples} >= 2")
    out: list[tuple[int, int] | None] = []
    for start in range(0, len(scores), n_samples):
        group = scores[start : start + n_samples]
        best = max(range(n_samples), key=group.__getitem__)  # max and min keep the first
        worst = min(range(n_samples), key=group.__getitem__)
        tie = group[best] - group[worst] <= min_gap
        out.append(None if tie else (start + best, start + worst))
    return out


def make_pairs(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    scores: Sequence[float],
    n_samples: int,
    min_gap: float = 0.0,
) -> tuple[list[dict], int]:
    """One pair per prompt from its samples (prompt-major rows): its best (chosen) against its
    worst (rejected). Returns the pairs, as rows `collate_pairs` takes (with `chosen_score` and
    `rejected_score`), and the number of prompts dropped as ties: scores within `min_gap`, or a
    best and a worst reply of the very same tokens."""
    rows, ties = [], 0
    for pick in best_and_worst(scores, n_samples, min_gap):
        if pick is None or list(completion_ids[pick[0]]) == list(completion_ids[pick[1]]):
            ties += 1
            continue
        c, r = pick
        rows.append(
            {
                "prompt_input_ids": list(prompt_ids[c]),
                "chosen_input_ids": list(completion_ids[c]),
                "rejected_input_ids": list(completion_ids[r]),
                "chosen_score": scores[c],
                "rejected_score": scores[r],
            }
        )
    return rows, ties


def refresh_reference(pl_module: L.LightningModule) -> None:
    """Iterative DPO: the policy's current weights copied into the frozen reference."""
    try:
        pl_module.reference.load_state_dict(pl_module.policy.state_dict())
    except RuntimeError as err:
        raise ValueError(
            "refresh_reference copies the policy's weights into the reference, but they are not "
            f"the same architecture: {str(err).splitlines()[0]}"
        ) from err


def _placeholders(items: list[int]) -> dict[str, torch.Tensor]:
    return {PLACEHOLDER: torch.tensor(items)}


def _seed(*parts: int) -> int:
    """A sampling seed for (seed, round, rank, attempt): distinct for each, the same every run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class OnlineDPO(Callback):
    """Online DPO with a DPOModule: every round, pairs from the policy's own samples ranked by
    `judge` (see the module's docstring for the round, docs/online.md for the settings).

    Logged every round (on the step that starts it; averaged over ranks, counts summed):
    `online/score` (the judge's mean score of all samples: what online DPO raises),
    `online/score_chosen`, `online/score_rejected`, `online/pairs`, `online/ties`,
    `online/kl` (mean log pi - log pi_ref over `kl_samples` samples per prompt, against the
    reference before any refresh; an unbiased estimate of KL(pi || pi_ref) at temperature 1 and
    top_p 1 only; not logged reference-free), `online/reply_tokens`, `online/round` and
    `online/seconds` (sampling, scoring and the KL estimate). Only steps the logger writes show
    (`log_every_n_steps`: make it divide `sync_every`). Each rank keeps its rounds in `rounds`.

    Args:
        judge: scores the replies: a `lit_dpo.judges.Judge` (from a config, by `class_path`) or,
            from Python, any callable (prompts, replies) -> one float per reply, higher better.
        prompts: a list of prompts (text: one user message; or message lists), or a file of them
            (`.jsonl`: each row's `prompt`; else one a line). None: the distinct prompts of the
            data module's train split, tokenized exactly as in training.
        sync_every: optimizer steps per round: 1 is fully online; more: semi-online; many, with
            refresh_reference: iterative DPO.
        refresh_reference: at the start of every round but the first, copy the policy's weights
            into the reference (`reference: copy` or `separate` of the same architecture; not
            with LoRA).
        n_samples: replies sampled per prompt (at least 2); the best and the worst make a pair.
        max_new_tokens: length limit of each reply.
        temperature: sampling temperature.
        top_p: nucleus sampling mass (1: the full distribution).
        batch_size: pairs per training batch. None: the data module's `batch_size` (else 4).
            A round samples `batch_size * sync_every * accumulate_grad_batches` prompts per rank;
            when ties leave fewer pairs, the round's batches take its pairs over again.
        generation_batch_size: sequences per `generate` call and per KL forward pass.
        kl_samples: replies per prompt the KL estimate reads (the first; each is a sample of
            pi: still unbiased, at a fraction of the forward passes); None: all of them.
        min_gap: a pair needs best - worst > min_gap; closer is a tie.
        max_attempts: a rank whose prompts all tie samples them again with a new seed, up to
            this many times in all, then stops the run (the judge cannot rank the replies).
        seed: seeds the prompt order and the sampling.
    """

    checkpoint_key = CHECKPOINT_KEY  # DPOModule refuses an online checkpoint without it

    def __init__(
        self,
        judge: Judge,
        prompts: list[str] | str | None = None,
        sync_every: PositiveInt = 1,
        refresh_reference: bool = False,
        n_samples: PositiveInt = 4,
        max_new_tokens: PositiveInt = 48,
        temperature: PositiveFloat = 1.0,
        top_p: ClosedUnitInterval = 1.0,
        batch_size: PositiveInt | None = None,
        generation_batch_size: PositiveInt = 64,
        kl_samples: PositiveInt | None = 1,
        min_gap: NonNegativeFloat = 0.0,
        max_attempts: PositiveInt = 4,
        seed: int = 0,
    ):
        if n_samples < 2:
            raise ValueError(f"n_samples must be at least 2 to make a pair, got {n_samples}")
        if not callable(judge):
            raise TypeError(f"judge must be callable (prompts, replies) -> scores, got {judge!r}")
        self.judge: JudgeFn = judge
        self.prompts, self.sync_every, self.batch_size = prompts, sync_every, batch_size
        self.refresh_reference, self.kl_samples = refresh_reference, kl_samples
        self.min_gap, self.max_attempts = min_gap, max_attempts
        # how replies are sampled; its seed orders the prompts and gives each round its own
        self.sampling = Sampling(
            n_samples, max_new_tokens, temperature, top_p, generation_batch_size, seed
        )
        self.rounds: list[dict] = []  # this rank's rounds: prompts (indices), counts, scores
        self._texts: list[str] = []  # the prompts as the judge reads them
        self._ids: list[list[int]] = []  # and as the policy does
        self._orders: dict = {}  # (rank, world) -> the rank's shard; pass -> its order
        self._tokenizer = None
        self._trainer: L.Trainer | None = None
        self._patched = None  # what got our train loader
        self._pairs_per_batch = 4
        self._served = 0  # training batches made this fit (counted from the restored step)
        self._round: int | None = None  # the round the buffer belongs to
        self._first = 0  # the round's batch the buffer starts at (0 but after a resume)
        self._buffer: list[dict] = []
        self._refreshed = False  # the reference holds weights other than its initial ones

    # -- setting up --------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        mode = getattr(pl_module, "reference_mode", None)
        if mode is None:
            raise ValueError(f"OnlineDPO trains a DPOModule, not a {type(pl_module).__name__}")
        if mode == "precomputed":
            raise ValueError(
                "OnlineDPO cannot use reference='precomputed' (log-probs of the data, computed "
                "before training): its pairs are new every round; use copy, separate or adapter"
            )
        if isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):
            raise ValueError("OnlineDPO runs on one device or under DDP; not under FSDP")
        lora = pl_module.hparams.get("lora") is not None or has_adapters(pl_module.model_source())
        if self.refresh_reference and (mode not in ("copy", "separate") or lora):
            raise ValueError(
                f"refresh_reference copies the policy into the reference network, which "
                f"reference={mode!r}{' with LoRA' if lora else ''} does not hold: use "
                "reference copy or separate, without LoRA"
            )
        self._trainer = trainer
        self._tokenizer = policy_tokenizer(pl_module)
        self._texts, self._ids = self._read_prompts(trainer)
        hparams = getattr(trainer.datamodule, "hparams", {})
        self._pairs_per_batch = self.batch_size or hparams.get("batch_size") or 4
        self._patched = trainer.datamodule if trainer.datamodule is not None else pl_module
        self._patched.train_dataloader = self.train_dataloader

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._patched is not None:
            del self._patched.train_dataloader  # the data module's own loader again
            self._patched = None

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def _read_prompts(self, trainer: L.Trainer) -> tuple[list[str], list[list[int]]]:
        """(the prompts as the judge reads them, as the policy does)."""
        tokenizer = self._tokenizer
        if self.prompts is not None:
            texts, ids = samples.tokenized_prompts(
                tokenizer, samples.read_prompts(self.prompts), "OnlineDPO"
            )
        else:
            data = getattr(trainer.datamodule, "train_dataset", None)
            if data is None or "prompt_input_ids" not in data.column_names:
                raise ValueError(
                    "OnlineDPO: no prompts given, and no data module with a train split to take "
                    "them from: pass `prompts` (a list or a file)"
                )
            ids = samples.distinct_prompt_ids(data)
            texts = [samples.shown_prompt(tokenizer, p) for p in ids]
        if not ids:
            raise ValueError("OnlineDPO: no prompts to sample from")
        return texts, ids

    def train_dataloader(self) -> StatefulDataLoader:
        """What paces training: one placeholder a batch, `on_train_batch_start` makes the batches
        themselves. An epoch is the whole run under `max_steps` (so `val_check_interval` counts
        its steps, as with any data), else a pass over each rank's share of the prompts."""
        trainer, b = self._trainer, self._pairs_per_batch
        world, rank = trainer.world_size, trainer.global_rank
        if trainer.max_steps > 0:
            per_rank = trainer.max_steps * trainer.accumulate_grad_batches
        else:
            per_rank = math.ceil(len(self._ids) / (b * world))
        steps = range(per_rank * world)
        sampler = DistributedSampler(steps, num_replicas=world, rank=rank, shuffle=False)
        return StatefulDataLoader(steps, batch_size=1, sampler=sampler, collate_fn=_placeholders)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._served = trainer.global_step * trainer.accumulate_grad_batches
        self._round = None  # a resumed run starts with a fresh round
        if isinstance(self.judge, Judge):
            self.judge.to(pl_module.device)

    # -- a round, and its batches -------------------------------------------------------------

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if not isinstance(batch, dict):
            raise TypeError(f"OnlineDPO fills dict batches, got a {type(batch).__name__}")
        batches = self.sync_every * trainer.accumulate_grad_batches  # a round's
        round_, position = divmod(self._served, batches)
        if round_ != self._round:
            self._start_round(trainer, pl_module, round_, position)
        b, pairs = self._pairs_per_batch, self._buffer
        j = position - self._first
        rows = [pairs[(j * b + i) % len(pairs)] for i in range(b)]  # ties: pairs over again
        made = collate_pairs(rows, pad_token_id(self._tokenizer))  # (2B, T) pairs
        batch.clear()  # the very dict the training step receives
        batch.update({k: v.to(pl_module.device) for k, v in made.items()})
        self._served += 1

    def _stream(self, rank: int, world: int, start: int, count: int) -> list[int]:
        """Prompt indices at positions start..start+count-1 of this rank's stream: pass after
        pass over its shard (every `world`-th prompt of a seeded order of all), each pass in a
        seeded order of its own."""
        if (rank, world) not in self._orders:
            order = torch.randperm(
                len(self._ids), generator=torch.Generator().manual_seed(self.sampling.seed)
            )
            self._orders = {(rank, world): order.tolist()[rank::world]}
        shard, out = self._orders[(rank, world)], []
        if not shard:
            raise ValueError(f"OnlineDPO: {len(self._ids)} prompts for {world} ranks: too few")
        for i in range(start, start + count):
            p, k = divmod(i, len(shard))
            if p not in self._orders:
                g = torch.Generator().manual_seed(_seed(self.sampling.seed, rank, p))
                self._orders = {q: o for q, o in self._orders.items() if not isinstance(q, int)}
                self._orders[p] = torch.randperm(len(shard), generator=g).tolist()
            out.append(shard[self._orders[p][k]])
        return out

    def _start_round(self, trainer: L.Trainer, pl_module, round_: int, position: int) -> None:
        """Sample, score and pair this rank's prompts of `round_`, from the batch at `position`
        on (0 but when resumed mid-round)."""
        start = time.perf_counter()
        b, rank = self._pairs_per_batch, trainer.global_rank
        per_rank = b * self.sync_every * trainer.accumulate_grad_batches
        start_at = round_ * per_rank + position * b
        indices = self._stream(rank, trainer.world_size, start_at, per_rank - position * b)
        tokenizer, ties, kl, n = self._tokenizer, 0, None, self.sampling.n_samples
        for attempt in range(self.max_attempts):
            sampling = Sampling.of(
                self.sampling, seed=_seed(self.sampling.seed, round_, rank, attempt)
            )
            prompt_ids = [self._ids[i] for i in indices]
            prompt_ids, completion_ids = generate_ids(
                pl_module.policy, tokenizer, prompt_ids, sampling, progress=False
            )  # prompt-major: n_samples rows per prompt
            if attempt == 0:
                kl = self._kl(pl_module, prompt_ids, completion_ids)
                if self.refresh_reference and position == 0 and round_ > 0:
                    refresh_reference(pl_module)
                    self._refreshed = True
            asked = [self._texts[i] for i in indices for _ in range(n)]
            scores = judge_scores(self.judge, asked, decode(tokenizer, completion_ids))
            pairs, dropped = make_pairs(prompt_ids, completion_ids, scores, n, self.min_gap)
            ties += dropped
            if pairs:
                break
        else:
            raise ValueError(
                f"OnlineDPO, round {round_}, rank {rank}: the replies to each of its "
                f"{len(indices)} prompts tied under the judge {describe_judge(self.judge)} in "
                f"{self.max_attempts} attempts: no pair to train on"
            )
        self._round, self._first, self._buffer = round_, position, pairs
        record = {
            "round": round_,
            "step": trainer.global_step,
            "prompts": indices,
            "pairs": len(pairs),
            "ties": ties,
            "attempts": attempt + 1,
            "score": statistics.fmean(scores),
            "score_chosen": statistics.fmean(p["chosen_score"] for p in pairs),
            "score_rejected": statistics.fmean(p["rejected_score"] for p in pairs),
            "kl": kl,
            "reply_tokens": statistics.fmean(map(len, completion_ids)),
            "seconds": time.perf_counter() - start,
        }
        self.rounds.append(record)
        self._log(pl_module, record)

    def _kl(self, pl_module, prompt_ids, completion_ids) -> float | None:
        """Mean log pi(y|x) - log pi_ref(y|x) over the first `kl_samples` samples of each
        prompt; None without a reference."""
        pad, size = pad_token_id(self._tokenizer), self.sampling.batch_size
        n = self.sampling.n_samples
        read = [i % n < (self.kl_samples or n) for i in range(len(prompt_ids))]
        prompt_ids = [p for p, r in zip(prompt_ids, read, strict=True) if r]
        completion_ids = [c for c, r in zip(completion_ids, read, strict=True) if r]
        with samples.reference_model(pl_module) as reference:
            if reference is None:
                return None
            ref = log_ratios(reference, None, prompt_ids, completion_ids, pad, size)
        policy = log_ratios(pl_module.policy, None, prompt_ids, completion_ids, pad, size)
        return (policy - ref).mean().item()

    def _log(self, pl_module, record: dict) -> None:
        summed = ("pairs", "ties")
        for key in ("score", "score_chosen", "score_rejected", "kl", "reply_tokens", "round",
                    "seconds", *summed):  # fmt: skip
            if record[key] is None:
                continue
            pl_module.log(
                f"online/{key}", float(record[key]), on_step=True, on_epoch=False,
                sync_dist=True, reduce_fx="sum" if key in summed else "mean", batch_size=1,
            )  # fmt: skip

    # -- checkpoints -------------------------------------------------------------------------

    def settings(self) -> dict:
        """What defines the run's pairs: resuming with other settings is refused."""
        digest = hashlib.sha256(repr(self._ids).encode()).hexdigest()[:16]
        return {
            "judge": describe_judge(self.judge),
            "prompts": f"{len(self._ids)} prompts {digest}",
            "sync_every": self.sync_every,
            "refresh_reference": self.refresh_reference,
            **{k: v for k, v in vars(self.sampling).items() if k != "batch_size"},
            "batch_size": self._pairs_per_batch,
            "min_gap": self.min_gap,
        }

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        state: dict = {"settings": self.settings()}
        if self._refreshed:  # the reference is rebuilt from its initial weights otherwise
            state["reference"] = pl_module.reference.state_dict()
        checkpoint[CHECKPOINT_KEY] = state

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:  # e.g. an offline DPO checkpoint, continued online
            return
        now = self.settings() if trainer.state.fn == "fit" else {}  # validate: no prompts read
        found = [
            f"{k}={v!r}, this run has {k}={now[k]!r}"
            for k, v in saved["settings"].items()
            if k in now and v != now[k]
        ]
        if found:
            raise ValueError(
                f"the checkpoint's online DPO ran with {'; with '.join(found)}: resume with the "
                "same settings, or start a new run"
            )
        if "reference" in saved:
            pl_module.reference.load_state_dict(saved["reference"])
            self._refreshed = True
