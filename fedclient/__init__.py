"""The school daemon: joins the federation, trains LoRA on local data, uploads deltas only."""
