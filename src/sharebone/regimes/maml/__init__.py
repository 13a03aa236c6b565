"""The MAML family (MAML, first-order MAML, ANIL, Meta-SGD, Reptile, iMAML): the regime, its
options, the meta-batch chunking, precision checks, and learn2learn as an optional backend
(``l2l``)."""
