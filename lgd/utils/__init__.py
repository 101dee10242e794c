"""Helpers under every part: atomic file writes, strict JSON and weights-only torch files, the processes of a
torchrun launch, the device and seeds of a process, and lazy package faces."""
