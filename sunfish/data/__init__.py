"""The data layer: corpora -> documents, byte-level BPE, token files and batches, prompt/text pairs.

Modules: ``corpora`` (sources), ``tokenizer`` (TextTokenizer, train_bpe, from_pretrained),
``dataset`` (TokenStream, PairDataset), ``prompts`` (build_pairs, adherent) and ``prepare``
(prepare_corpus, the prepare stage). Nothing is imported here so that ``import sunfish.data`` stays
cheap (dataset.py pulls in torch).
"""
