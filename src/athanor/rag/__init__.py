"""Retrieval-augmented generation: facts that change live in an index, not in the weights.

chunking.py cuts files into line-aligned passages (Python by whole functions and classes); terms.py
splits text into the words BM25 counts; embed.py holds the dense encoder; index.py keeps both
retrievers over the chunks on disk and fuses their rankings; answer.py asks a model with the
passages and reads its citations; evaluate.py scores retrieval and answers against gold passages.
"""
