"""Image captioning: epochs of shuffled image-caption samples, the next-token loss of the captions
after the image prefix, and greedy captions scored against the scenes they describe
(`tokenformer train-captioner`, the model `tokenformer.models.captioner`)."""

from __future__ import annotations

import json
import reprlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tokenformer.data import images
from tokenformer.data.image_text import ImageTextSamples, open_image_text, take_image_text
from tokenformer.data.prepare import train_bpe
from tokenformer.data.scenes import parse_caption
from tokenformer.data.tokenizer import Tokenizer, check_vocab_fits, load_tokenizer
from tokenformer.errors import TokenFormerError
from tokenformer.files import TOKENIZER_FILE, atomic_write_text
from tokenformer.generate import generate_caption
from tokenformer.models.captioner import Captioner, CaptionerConfig, caption_loss
from tokenformer.training.config import CaptionTrainConfig
from tokenformer.training.distributed import DistEnv, all_reduce_mean, unwrap
from tokenformer.training.registry import TrainingCommand, register
from tokenformer.training.tasks.base import EpochTask, TaskContext

CAPTIONS_FILE = "captions.jsonl"
# the attributes of one object of a scene caption, in the order `parse_caption` gives them
ATTRIBUTES = ("count", "colour", "shape", "position")


def resolve_tokenizer(cfg: CaptionTrainConfig, captions: list[str]) -> Tokenizer:
    """`cfg.tokenizer`: a file or 'byte'; by default the tokenizer of `lm_from` or `init_from` when
    they have one, else a byte-level BPE of `bpe_vocab_size` trained on the training `captions`."""
    spec = cfg.tokenizer
    if spec is None:
        spec = next((str(Path(d) / TOKENIZER_FILE) for d in (cfg.lm_from, cfg.init_from)
                     if d and (Path(d) / TOKENIZER_FILE).is_file()), "bpe")
    return train_bpe(captions, cfg.bpe_vocab_size) if spec == "bpe" else load_tokenizer(spec)


def caption_rows(encoded: list[list[int]], eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows `[eos, caption..., eos]` right-padded with eos (B, L), and their lengths (B,): the
    end-of-text token opens a caption (the position that predicts its first word) and closes it."""
    rows = [[eos_id, *ids, eos_id] for ids in encoded]
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [eos_id] * (width - len(row)) for row in rows])  # (B, L)
    return ids, torch.tensor([len(row) for row in rows])


def scene_groups(extra: dict | None, where: str = "a sample") -> list[tuple] | None:
    """The (count, colour, shape, position) groups of a sample's scene attributes
    (`tokenformer.data.scenes.Scene.attributes`, the sample's KEY.json), or None without them; a
    group of another form is one sentence naming `where` the sample is."""
    if not isinstance(extra, dict) or not isinstance(extra.get("groups"), list):
        return None
    for group in extra["groups"]:
        if not (isinstance(group, list) and len(group) == 4 and isinstance(group[0], int)
                and all(isinstance(part, str) for part in group[1:])):
            raise TokenFormerError(f"the scene attributes (.json) of {where} hold the group {reprlib.repr(group)}, "
                                   f"not [count, colour, shape, position]: write them again (Scene.attributes())")
    return [tuple(group) for group in extra["groups"]]


def attribute_matches(truth: list[tuple], predicted: list[tuple]) -> np.ndarray:
    """[whole scene right, then per attribute of ATTRIBUTES the groups it matches, then the group
    count it is divided by] for one caption's groups (`parse_caption`) against its scene's.

    Groups are compared as multisets, whatever the order the caption lists them in; an attribute
    matches min(true, predicted) groups per value, divided by the larger of the two group counts,
    so an invented group costs as much as a missing one, and a caption that does not parse (no
    group) matches nothing.
    """
    objects = max(len(truth), len(predicted), 1)
    exact = float(Counter(truth) == Counter(predicted))
    matched = [sum((Counter(t[a] for t in truth) & Counter(p[a] for p in predicted)).values())
               for a in range(len(ATTRIBUTES))]
    return np.array([exact, *matched, objects], dtype=np.float64)


def accuracy_record(totals: np.ndarray, scenes: float) -> dict[str, float]:
    """`attribute_matches` summed over `scenes` captions as accuracies."""
    exact, *matched, objects = (float(t) for t in totals)  # plain floats: checkpoints hold the records
    return {"exact_match": exact / float(scenes),
            **{f"{a}_accuracy": m / objects for a, m in zip(ATTRIBUTES, matched)}}


class CaptionTask(EpochTask):
    """Captioning: epochs of shuffled samples (`drop_last`), the caption loss on the validation
    samples and, on the first `caption_samples` of them, greedy captions with scene accuracy."""

    unit = "captions"
    validate_at_start = True
    plot_title = "image captioning"
    loss_label = "caption loss (nats/token)"
    # the captions' token counts differ from batch to batch: the loop weights each micro-batch by
    # its count, so a step's loss is the mean over the global batch's caption tokens
    loss_terms_vary = True

    def __init__(self, cfg: CaptionTrainConfig) -> None:
        if cfg.data is None:
            raise TokenFormerError("train-captioner needs `data`: image-text shards (e.g. `tokenformer make-scenes` "
                                   "OUT/train) or a folder of images with captions.csv")
        self.train = open_image_text(cfg.data)  # fail on missing data before building a model
        super().__init__(cfg, min(len(self.train), cfg.max_train_samples or len(self.train)))
        self.val = open_image_text(cfg.val_data) if cfg.val_data else None
        captions = self.train.captions[:self.num_train]
        self.tokenizer = resolve_tokenizer(cfg, captions)
        self.train_ids = self.tokenizer.encode_batch(captions)
        self.captions: list[dict[str, Any]] = []  # the last evaluation's generated captions
        self.name = "train-captioner"

    def build_model(self) -> nn.Module:
        if self.cfg.vision_from:
            return Captioner.from_parts(self.cfg.vision_from, self.cfg.lm_from).train()
        config = CaptionerConfig.resolve(self.cfg.model)
        return Captioner(config.replace(vocab_size=self.tokenizer.vocab_size))

    def prepare(self, model: nn.Module, ctx: TaskContext) -> None:
        if not isinstance(model, Captioner):
            raise TokenFormerError(f"train-captioner trains a captioner, not a {type(model).__name__}: give a "
                                   f"captioner checkpoint as init_from")
        config = model.config
        check_vocab_fits(self.tokenizer.vocab_size, config.text.padded_vocab_size,
                         fix="use the tokenizer the captioner was trained with (`tokenizer`)")
        self.train.channels = config.vision.num_channels
        splits = [("training", self.train, self.train_ids)]
        if self.val is not None:
            self.val.channels = config.vision.num_channels
            self.val_ids = self.tokenizer.encode_batch(self.val.captions)
            splits.append(("validation", self.val, self.val_ids))
        for what, _, encoded in splits:
            longest = max(len(ids) for ids in encoded) + 2
            if config.prefix_length + longest - 1 > config.text.seq_length:
                raise TokenFormerError(
                    f"the longest {what} caption takes {longest} tokens, which with {config.prefix_length} image "
                    f"tokens exceeds the language model's seq_length {config.text.seq_length}: raise it "
                    f"(model: {{text: {{seq_length: ...}}}})")
        self.transform = images.make_transform(False, "none", config.image_mean, config.image_std,
                                               config.vision.image_size)

    def batch(self, samples: ImageTextSamples, encoded: list[list[int]], index: torch.Tensor) -> tuple:
        x, _ = take_image_text(samples, index, self.transform)  # (B, C, H, W)
        ids, lengths = caption_rows([encoded[int(i)] for i in index], self.tokenizer.eos_id)
        return x, ids, lengths

    def train_batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, _, index = self.epoch_slice(first, size)
        return self.batch(self.train, self.train_ids, index)

    def loss(self, model: nn.Module, batch: tuple, ctx: TaskContext) -> tuple[torch.Tensor, int]:
        images_, ids, lengths = batch
        return caption_loss(model, images_, ids, lengths), int((lengths - 1).sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: TaskContext) -> dict[str, Any] | None:
        """The validation caption loss over every validation sample, and the scene accuracy of the
        greedy captions of the first `caption_samples` (collective: each rank takes its share and the
        sums are all-reduced; the plain model runs, not its DDP wrapper, since ranks may hold
        different numbers of batches)."""
        if self.val is None:
            return None
        env = ctx.env
        model = unwrap(model)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        shard = (env.rank, env.world_size)
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, tokens
        for index in images.batch_indices(len(self.val), self.cfg.eval_batch_size, False, None, False, shard):
            x, ids, lengths = (t.to(device) for t in self.batch(self.val, self.val_ids, index))
            loss = caption_loss(model, x, ids, lengths, reduction="sum")
            totals += torch.stack([loss.double(), (lengths - 1).sum().double()])
        loss_sum, tokens = all_reduce_mean(totals, env).tolist()
        record: dict[str, Any] = {"val_loss": loss_sum / tokens}
        if self.cfg.caption_samples:
            record.update(self.caption_accuracy(model, env, device))
        model.train(was_training)
        return self.add_record(ctx, record)

    def caption_accuracy(self, model: Captioner, env: DistEnv, device: torch.device) -> dict[str, Any]:
        """Greedy captions of this rank's share of the first `caption_samples` validation samples,
        scored against their scenes when the samples carry scene attributes."""
        count = min(self.cfg.caption_samples, len(self.val))
        totals = np.zeros(2 + len(ATTRIBUTES) + 1)  # scenes, exact, per attribute, objects
        self.captions = []
        mine = torch.arange(count).tensor_split(env.world_size)[env.rank]
        for index in mine.split(self.cfg.eval_batch_size):
            x, references = take_image_text(self.val, index, self.transform)
            texts = generate_caption(model, self.tokenizer, x.to(device),
                                     min(self.cfg.max_new_tokens, model.config.caption_room))
            for i, reference, text in zip(index.tolist(), references, texts):
                truth = scene_groups(self.val.extra(i), self.val.where(i))
                self.captions.append({"key": self.val.key(i), "reference": reference, "caption": text})
                if truth is not None:
                    totals += np.concatenate([[1.0], attribute_matches(truth, parse_caption(text))])
        summed = all_reduce_mean(torch.tensor(totals, device=device), env).double().cpu().numpy()
        scenes = summed[0]
        record: dict[str, Any] = {"captioned": count}
        if scenes > 0:
            record.update(accuracy_record(summed[1:], scenes))
        if self.captions:
            record["example"] = self.captions[0]["caption"]
        return record

    def describe(self, record: dict[str, Any]) -> str:
        line = f"epoch {record['epoch']}: validation caption loss {record['val_loss']:.4f}"
        if "exact_match" in record:
            line += (f", exact scenes {100 * record['exact_match']:.1f}% ("
                     + ", ".join(f"{a} {100 * record[f'{a}_accuracy']:.1f}%" for a in ATTRIBUTES) + ")")
        if "example" in record:
            line += f"; e.g. {record['example']!r}"
        return line

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        super().load_state(state, path)
        saved = load_tokenizer(path)  # the run's tokenizer: a BPE trained again could differ
        if saved.vocab_size != self.tokenizer.vocab_size:
            raise TokenFormerError(f"{path} was trained with a tokenizer of {saved.vocab_size} tokens, this run has "
                                   f"{self.tokenizer.vocab_size}: resume with the same `tokenizer` settings")
        self.tokenizer = saved
        self.train_ids = saved.encode_batch(self.train.captions[:self.num_train])
        if self.val is not None:
            self.val_ids = saved.encode_batch(self.val.captions)

    def finish(self, model: nn.Module, ctx: TaskContext) -> dict[str, Any]:
        """Write `model/` (the final weights and the tokenizer) and the last evaluation's captions
        (`captions.jsonl`: under torchrun, those rank 0 generated)."""
        outputs = super().finish(model, ctx)
        if ctx.folder is not None and ctx.env.is_main:
            atomic_write_text(ctx.folder.output(CAPTIONS_FILE), "".join(json.dumps(c) + "\n" for c in self.captions))
        return outputs

    @staticmethod
    def report(summary: dict[str, Any]) -> str:
        last = summary["validation"] or {}
        line = (f"trained {summary['epochs']} epochs ({summary['step']} steps, {summary['wall_time_s']:.0f} s, "
                f"{summary['num_parameters']:,} parameters)")
        if "val_loss" in last:
            line += f": validation caption loss {last['val_loss']:.4f}"
        if "exact_match" in last:
            line += f", exact scenes {100 * last['exact_match']:.1f}%"
        return line


register(TrainingCommand(
    "train-captioner", CaptionTrainConfig, CaptionTask, Captioner, example="configs/captioner-scenes.yaml",
    help="""Train an image captioner: a vision TokenFormer's tokens as the prefix of a TokenFormer LM.

Fields come from the YAML CONFIG, then `--field value` overrides (every field below). Data are
image-text samples (`tokenformer make-scenes` writes some); the tokenizer (by default a small
BPE trained on the training captions) is saved with every checkpoint. Each evaluation reports
the validation caption loss and, for scenes, the accuracy of greedy captions (whole scene and per
attribute). `save` gets checkpoints, metrics.jsonl, loss_curve.png, captions.jsonl and model/;
`--resume` continues exactly; under `torchrun`, DDP with `batch_size` the global batch. Caption
images with `tokenformer generate --checkpoint SAVE/model --image PATH`."""))
