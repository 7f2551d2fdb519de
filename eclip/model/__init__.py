"""EntityCLIP: CLIP towers (backbone), Multimodal Attentive Experts (experts),
the gated image-text matching head (itm) and the training objective (loss)."""
