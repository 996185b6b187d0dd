"""The model and its lifecycle: data, preprocessing, networks, training, artifacts, the registry, the champion
pointer, the promotion gate and retraining. Import the submodule you need (``model.train``, ``model.registry``,
...): this package imports nothing itself, so reading the champion pointer (``model.registry``'s file helpers)
does not have to load what training needs.
"""
