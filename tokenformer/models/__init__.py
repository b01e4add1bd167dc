"""The models: Pattention, the TokenFormer language model, the vision TokenFormer, their configs,
the model directory format, and the official checkpoint layout."""
