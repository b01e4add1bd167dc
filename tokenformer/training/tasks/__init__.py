"""What the training loop trains on: one file a task, each holding its task class (the contract is
`base.Task`, or `base.EpochTask` for a task counted in epochs) and registering its command with
`tokenformer.training.registry`, which imports every module here when it is first read.

`language.LanguageModelTask` (`tokenformer train`), `vision.VisionTask` (`tokenformer
train-vision`), `caption.CaptionTask` (`tokenformer train-captioner`), `clip.ClipTask`
(`tokenformer train-clip`).
"""
