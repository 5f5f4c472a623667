"""Codecs that turn stored weight bytes into float matrices (GGML block formats for now)."""
