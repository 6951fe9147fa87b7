"""The streaming transform: raw file in, canonical parquet and rejects out, in bounded memory."""
