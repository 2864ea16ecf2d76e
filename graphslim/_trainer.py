"""The execution child's ``trainer`` engine (imported only by ``_worker``): graphslim's IR as a
TensorFlow graph whose trainable weights are variables, with a distillation loss and Adam.

The graph is imported exactly as the graph engine imports it (GraphDef + weights, never the input
SavedModel's own functions), then the loss terms the parent asked for are added. Each term compares a
tensor of the graph (the *student*) with a target the parent feeds (the original model's value on the
same batch, or labels):

=========  ============================================================================================
``kl``     the tensor holds logits, the target probabilities: KL(target ‖ softmax(logits / T)) · T²
``bce``    the tensor holds logits, the target sigmoid probabilities: binary cross-entropy − its minimum
``l2``     mean squared difference, divided by ``scale`` (the target's variance, so terms are comparable)
``label``  the tensor holds logits, the target integer classes: softmax cross-entropy
=========  ============================================================================================

The total is the weighted sum. Requests (see :class:`graphslim.sandbox.Child`): ``train`` (one Adam step
at the given learning rate; the loss before the step), ``evaluate`` (the loss, and the signature outputs,
without a step), ``weights`` (the trainable weights' current values), ``grad_products`` (per example,
``Σ ∂L/∂a · a`` over every axis of the requested activations ``a`` but one, with L the summed cross-entropy
of given logits against their own argmax: the mask gradients of the Fisher pruning criterion).
"""

from __future__ import annotations

__all__ = ["TrainerEngine"]

KINDS = ("kl", "bce", "l2", "label")


class TrainerEngine:
    def __init__(self, tf, np, header, arrays, threads, graph_def):
        self.tf, self.np = tf, np
        self.inputs = dict(header["inputs"])
        self.outputs = dict(header["outputs"])
        trainable = set(header["trainable"])
        self.graph = tf.Graph()
        feed, init, mapping = {}, [], {}
        self.variables = {}
        with self.graph.as_default():
            with tf.name_scope("graphslim.weights"):
                for name in header["weights"]:
                    value = arrays.pop(f"w:{name}")
                    ph = tf.compat.v1.placeholder(tf.as_dtype(value.dtype), value.shape)
                    train = name in trainable and value.dtype.kind == "f"
                    var = tf.Variable(ph, trainable=train, shape=value.shape)
                    feed[ph] = value
                    init.append(var.initializer)
                    mapping[f"{name}:0"] = var.read_value()
                    if train:
                        self.variables[name] = var
            tf.graph_util.import_graph_def(graph_def, input_map=mapping, name="")
            with tf.name_scope("graphslim.loss"):
                self.lr = tf.compat.v1.placeholder(tf.float32, [], name="lr")
                self.targets, parts = {}, {}
                for term in header["terms"]:
                    kind, key = term["kind"], term["key"]
                    if kind not in KINDS:
                        raise ValueError(f"unknown loss term kind {kind!r}")
                    s = tf.cast(self.graph.get_tensor_by_name(term["tensor"]), tf.float32)
                    if kind == "label":
                        y = tf.compat.v1.placeholder(tf.int64, [None], name=f"target_{len(parts)}")
                        part = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=s))
                    else:
                        y = tf.compat.v1.placeholder(tf.float32, s.shape, name=f"target_{len(parts)}")
                        if kind == "kl":
                            t = float(term.get("temperature", 1.0))
                            p = y if t == 1.0 else tf.nn.softmax(tf.math.log(tf.maximum(y, 1e-12)) / t, axis=-1)
                            kl = tf.reduce_sum(tf.math.xlogy(p, p) - p * tf.nn.log_softmax(s / t, axis=-1), -1)
                            part = tf.reduce_mean(kl) * t * t
                        elif kind == "bce":
                            q = tf.clip_by_value(y, 0.0, 1.0)
                            ent = -(tf.math.xlogy(q, q) + tf.math.xlogy(1 - q, 1 - q))
                            part = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=q, logits=s) - ent)
                        else:
                            part = tf.reduce_mean(tf.square(s - y)) / float(term.get("scale", 1.0))
                    self.targets[key] = y
                    parts[key] = float(term.get("weight", 1.0)) * part
                self.parts = parts
                self.loss = tf.add_n(list(parts.values())) if parts else tf.constant(0.0)
                opt = tf.compat.v1.train.AdamOptimizer(self.lr)
                var_list = list(self.variables.values())
                self.step = opt.minimize(self.loss, var_list=var_list) if var_list else tf.no_op()
                init.extend(v.initializer for v in opt.variables())
            self._out = {n: tf.identity(self.graph.get_tensor_by_name(t), name="graphslim_out")
                         for n, t in self.outputs.items()}
        self.session = tf.compat.v1.Session(graph=self.graph, config=tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=threads, inter_op_parallelism_threads=1))
        self.session.run(init, feed_dict=feed)

    def _feed(self, inputs: dict, targets: dict) -> dict:
        feed = {self.graph.get_tensor_by_name(self.inputs[k]): v for k, v in inputs.items()}
        missing = set(self.targets) - set(targets)
        if missing:
            raise ValueError(f"no target values for {sorted(missing)}")
        feed.update({self.targets[k]: targets[k] for k in self.targets})
        return feed

    def train(self, inputs: dict, targets: dict, lr: float) -> dict:
        feed = self._feed(inputs, targets)
        feed[self.lr] = float(lr)
        loss, parts, _ = self.session.run([self.loss, self.parts, self.step], feed_dict=feed)
        return {"loss": float(loss), "parts": {k: float(v) for k, v in parts.items()}}

    def evaluate(self, inputs: dict, targets: dict) -> tuple[dict, dict]:
        loss, parts, out = self.session.run([self.loss, self.parts, self._out], feed_dict=self._feed(inputs, targets))
        return {"loss": float(loss), "parts": {k: float(v) for k, v in parts.items()}}, out

    def weights(self) -> dict:
        return self.session.run(self.variables)

    def grad_products(self, inputs: dict, logits: str, tensors: list) -> list:
        tf = self.tf
        key = (logits, tuple((str(t), int(a)) for t, a in tensors))
        built = self.__dict__.setdefault("_grads", {}).get(key)
        if built is None:
            with self.graph.as_default(), tf.name_scope("graphslim.fisher"):
                z = tf.cast(self.graph.get_tensor_by_name(logits), tf.float32)
                labels = tf.stop_gradient(tf.argmax(z, axis=-1))
                loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=z))
                acts = [self.graph.get_tensor_by_name(t) for t, _ in key[1]]
                built = []
                for a, g, (_, axis) in zip(acts, tf.gradients(loss, acts), key[1]):
                    rank = a.shape.rank
                    if rank is None or not 0 < axis % rank:
                        raise ValueError(f"{a.name}: axis {axis} is not a channel axis of a batched tensor")
                    g = tf.zeros_like(a) if g is None else tf.convert_to_tensor(g)
                    p = tf.cast(g, tf.float32) * tf.cast(a, tf.float32)
                    axes = [i for i in range(1, rank) if i != axis % rank]
                    built.append(tf.reduce_sum(p, axis=axes) if axes else p)
            self._grads[key] = built
        feed = {self.graph.get_tensor_by_name(self.inputs[k]): v for k, v in inputs.items()}
        return self.session.run(built, feed_dict=feed)

    def run(self, inputs, fetch):
        raise ValueError("the trainer engine answers train, evaluate, weights and grad_products requests only")

    def close(self):
        self.session.close()
