"""A five-row TFDS builder, prepared locally (no download) to test the TFDS source."""

import tensorflow_datasets as tfds


class TinyQa(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"question": tfds.features.Text(), "answer": tfds.features.Text()})
        return self.dataset_info_from_configs(features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(5):
            yield i, {"question": f"question {i}", "answer": f"answer {i}"}
