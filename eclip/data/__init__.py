"""Data: the one record type, benchmark readers, and safe image loading."""
