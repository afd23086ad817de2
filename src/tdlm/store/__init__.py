"""What is written to disk and read back, verified (layer 2): training checkpoints
(:mod:`.checkpoint`) and exported model folders (:mod:`.export`)."""
