"""Helpers under every part: the device and seeds of a process."""
