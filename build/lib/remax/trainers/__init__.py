"""One trainer per stage; they share the loop (``loop.py``), never each other's code."""
