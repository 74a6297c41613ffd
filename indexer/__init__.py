"""Turns an image dump into a catalog on disk: readers, safe decoding, encoders, FAISS + SQLite."""
