"""What the training loop trains on: a task supplies the data, the loss, the validation and the
outputs, and the one loop (`tokenformer.training.loop`) does everything else (optimizer, schedule,
checkpoints, exact resume, metrics, progress, torchrun).

A task has these members:

- `name` (the progress bar's label), `unit` and `units_per_sample` (what throughput counts:
  tokens per window, or one image), `tokenizer` (written into every checkpoint, or None),
  `validate_at_start`;
- `build_model()`: the model to train when none is given and there is no `init_from`;
- `prepare(model, env)`: load and check the data against the model (once, after seeding);
- `train_batch(first, size)`: global samples `first .. first + size - 1`, a deterministic
  function of the index: this is what makes resume and any number of ranks exact;
- `loss(model, batch) -> (mean loss, count)`; `loss_terms_vary` (optional, default false): the
  count differs between batches (caption tokens), so the loop weights each micro-batch by it and a
  step minimises the mean over all the global batch's terms, however it is split over ranks;
- `after_step(model, step)` (e.g. an average of the weights), `log_extras(env)` (more values for
  the metrics lines; collective: every rank calls it at the same steps);
- `evaluate(model, env, step) -> record | None`: the validation metrics (collective), and
  `describe(record)`: the line shown for them;
- `state()` saved in every checkpoint, `load_state(state, path)` when resuming from one;
- `finish(model, save, env) -> dict`: outputs written at the end (rank 0 writes files).

One file a task: `language.LanguageModelTask` (`tokenformer train`), `vision.VisionTask`
(`tokenformer train-vision`), `caption.CaptionTask` (`tokenformer train-captioner`),
`clip.ClipTask` (`tokenformer train-clip`).
"""

from tokenformer.training.tasks.caption import CaptionTask
from tokenformer.training.tasks.clip import ClipTask
from tokenformer.training.tasks.language import LanguageModelTask
from tokenformer.training.tasks.vision import VisionTask

__all__ = ["CaptionTask", "ClipTask", "LanguageModelTask", "VisionTask"]
