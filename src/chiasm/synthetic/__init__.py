"""The synthetic world of coloured shapes and the devices that exist only for it.

Nothing in the general path (model, conversation, trainer, evaluation, chat) imports this
package. Its parts are found by name through the registries' plugin tables when a config
asks for them:

- ``world``: scenes, questions and the LLaVA files of the world (``make_world``);
- ``layout``: the ``quadrants`` image layout (registered in ``chiasm.layout.LAYOUTS``);
- ``word_targets``: the ``words`` pre-alignment objective (``chiasm.train.objectives``);
- ``answers``: the world's answer normaliser, the ``synthetic`` VQA scorer
  (``chiasm.eval.scorers``);
- ``paraphrase``: the evaluation questions in wordings training never used.

This file imports none of them, so that loading one (say the layout, when a saved model is
read) does not pull in the others.
"""
