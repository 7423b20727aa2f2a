"""HTTP/1.x message handling for the data path: sans-IO, bytes in and out."""
