"""The allow-list of the safety scan: the op types graphslim accepts in a model, as data.

A SavedModel is a program (TensorFlow's own security guidance), and TensorFlow registers ~1,900 ops, some
of which read and write files, talk to other hosts, run Python, block, sleep or abort the process. A
deny-list cannot keep up with them, so :mod:`graphslim.io.scan` refuses every op type that is not listed
here (``--allow-ops OP`` accepts one knowingly; ``graphslim scan --list-allowed`` prints this list).

How the list was made: every op registered in TensorFlow 2.21 (``TF_GetAllOpList``: name, ``is_stateful``,
input/output types, attrs of type string and func) was reviewed by category. On the list are ops that only
compute on tensors in memory. Off the list, whatever else they do: files, checkpoints (see below), the
network, devices and collectives (TPU, NCCL, XLA host transfers, DTensor, Send/Recv, RPC), Python and native
code (PyFunc, XlaCallModule, XlaCustomCall, MlirPassthroughOp), debugging (Debug*, DumpTensor), summaries, tf.data
datasets and iterators, readers, queues, staging areas, barriers, accumulators, mutexes, batching (Batch,
BatchFunction), sessions, sleeping (SleepOp, SleepIdentityOp), aborting (Abort), uninitialized memory
(Empty), clocks (Timestamp), estimator resources (BoostedTrees*, Sdca*), experimental ops (Risc*),
TensorFlow's test ops, ops that are not pure enough to be sure of (SymbolicGradient,
CompositeTensorVariant*, DestroyResourceOp, TemporaryVariable, the deprecated V1/V2 TensorArray and V1
Stack ops), and every op TensorFlow does not register (custom ops of other libraries).

Three kinds of ops are decided by more than their name:

* :data:`CONDITIONAL` ops are allowed only with the attr values :func:`condition` checks (``PrintV2`` to
  stderr/stdout/log, ``Copy``/``CopyHost`` without debug specs, ``DecodeProtoV2``/``EncodeProto`` with the
  built-in descriptor pool).
* :data:`CHECKPOINT_OPS` are accepted only as the model's own checkpoint machinery, which
  :mod:`graphslim.io.scan` recognises from the saver and the object graph.
* A node whose op type names a function of the model's library is a call; the function is scanned.

``tests/hardening/test_scan.py`` checks that every name here is registered in the installed TensorFlow.
To review a new TensorFlow release: list the registered ops that are neither here nor known to be off,
decide, and add them to the right group with the reason in its comment.
"""

from __future__ import annotations

__all__ = ["ALLOWED", "CATEGORIES", "CHECKPOINT_OPS", "CONDITIONAL", "REFUSED_DETAIL", "condition", "describe"]

# Placeholders are fed by the caller; constants are data carried in the graph (their size is bounded by the loader).
INPUTS = frozenset({
    "Const", "HostConst", "Placeholder", "PlaceholderV2", "PlaceholderWithDefault",
})

# Functional control flow and calls (the functions they call are library functions, scanned like the graph), TF1
# frame ops (Switch/Merge/Enter/Exit/NextIteration/LoopCond, RefSelect), no-ops and identities, Assert, CheckPinned
# (an assertion) and Print (to stderr), the Optional ops cond_v2/while_v2 use to carry intermediates, the in-memory
# StackV2 ops of TF1 while-loop gradients, and DeviceIndex (the index of the device type among names: with a Case,
# how ``execute_fn_for_device`` picks a per-device implementation, e.g. in tf.nn.ctc_loss). A loop may not end: that
# is for the contained execution's time limit, not for the scan.
CONTROL_FLOW = frozenset({
    "Assert", "Case", "CheckPinned", "ControlTrigger", "DeviceIndex", "Enter", "Exit", "FakeParam", "For",
    "Identity", "IdentityN", "If", "LoopCond", "Merge", "NextIteration", "NoOp", "OptionalFromValue",
    "OptionalGetValue", "OptionalHasValue", "OptionalNone", "PartitionedCall", "Print", "RefEnter", "RefExit",
    "RefMerge", "RefNextIteration", "RefSelect", "RefSwitch", "StackCloseV2", "StackPopV2", "StackPushV2",
    "StackV2", "StatefulPartitionedCall", "StatelessCase", "StatelessIf", "StatelessWhile", "Switch", "While",
})

# TensorList/TensorMap values (variants) and TensorArrayV3 resources: in-memory containers of while loops, RNNs and
# detectors (Keras and TF2 while_v2 use TensorLists; TF1 while_loop uses TensorArrayV3). The deprecated V1/V2
# TensorArray ops (TF < 1.0) stay off.
TENSOR_LISTS = frozenset({
    "EmptyTensorList", "EmptyTensorMap", "TensorArrayCloseV3", "TensorArrayConcatV3", "TensorArrayGatherV3",
    "TensorArrayGradV3", "TensorArrayGradWithShape", "TensorArrayReadV3", "TensorArrayScatterV3",
    "TensorArraySizeV3", "TensorArraySplitV3", "TensorArrayV3", "TensorArrayWriteV3", "TensorListConcat",
    "TensorListConcatLists", "TensorListConcatV2", "TensorListElementShape", "TensorListFromTensor",
    "TensorListGather", "TensorListGetItem", "TensorListLength", "TensorListPopBack", "TensorListPushBack",
    "TensorListPushBackBatch", "TensorListReserve", "TensorListResize", "TensorListScatter",
    "TensorListScatterIntoExistingList", "TensorListScatterV2", "TensorListSetItem", "TensorListSplit",
    "TensorListStack", "TensorMapErase", "TensorMapHasKey", "TensorMapInsert", "TensorMapLookup",
    "TensorMapSize", "TensorMapStackKeys",
})

# Element-wise arithmetic, comparisons, logic and bit operations, reductions and scans, segment reductions, linear
# algebra and decompositions, FFTs, special functions, and the clustering helpers of tf.compat.v1 k-means.
MATH = frozenset({
    "Abs", "AccumulateNV2", "Acos", "Acosh", "Add", "AddN", "AddV2", "All", "Angle", "Any", "ApproximateEqual",
    "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atan2", "Atanh", "BandedTriangularSolve", "BatchCholesky",
    "BatchCholeskyGrad", "BatchFFT", "BatchFFT2D", "BatchFFT3D", "BatchIFFT", "BatchIFFT2D", "BatchIFFT3D",
    "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "BatchMatrixDeterminant", "BatchMatrixInverse",
    "BatchMatrixSolve", "BatchMatrixSolveLs", "BatchMatrixTriangularSolve", "BatchSelfAdjointEig",
    "BatchSelfAdjointEigV2", "BatchSvd", "BesselI0", "BesselI0e", "BesselI1", "BesselI1e", "BesselJ0",
    "BesselJ1", "BesselK0", "BesselK0e", "BesselK1", "BesselK1e", "BesselY0", "BesselY1", "Betainc",
    "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Ceil", "Cholesky", "CholeskyGrad", "ClipByValue", "Complex",
    "ComplexAbs", "Conj", "Cos", "Cosh", "Cross", "Cumprod", "Cumsum", "CumulativeLogsumexp", "Dawsn",
    "Digamma", "Div", "DivNoNan", "EditDistance", "Eig", "Einsum", "Equal", "Erf", "Erfc", "Erfinv",
    "EuclideanNorm", "Exp", "Expint", "Expm1", "FFT", "FFT2D", "FFT3D", "FFTND", "Floor", "FloorDiv",
    "FloorMod", "FresnelCos", "FresnelSin", "Greater", "GreaterEqual", "IFFT", "IFFT2D", "IFFT3D", "IFFTND",
    "IRFFT", "IRFFT2D", "IRFFT3D", "IRFFTND", "Igamma", "IgammaGradA", "Igammac", "Imag", "Inv", "InvGrad",
    "Invert", "IsFinite", "IsInf", "IsNan", "IsotonicRegression", "KMC2ChainInitialization",
    "KmeansPlusPlusInitialization", "LeftShift", "Less", "LessEqual", "Lgamma", "Log", "Log1p",
    "LogMatrixDeterminant", "LogicalAnd", "LogicalNot", "LogicalOr", "Lu", "MatMul", "MatrixDeterminant",
    "MatrixExponential", "MatrixInverse", "MatrixLogarithm", "MatrixSolve", "MatrixSolveLs", "MatrixSquareRoot",
    "MatrixTriangularSolve", "Max", "Maximum", "Mean", "Min", "Minimum", "Mod", "Mul", "MulNoNan", "Ndtri",
    "NearestNeighbors", "Neg", "NextAfter", "NotEqual", "Polygamma", "PopulationCount", "Pow", "Prod", "Qr",
    "RFFT", "RFFT2D", "RFFT3D", "RFFTND", "Real", "RealDiv", "Reciprocal", "ReciprocalGrad", "RightShift",
    "Rint", "Round", "Rsqrt", "RsqrtGrad", "SegmentMax", "SegmentMaxV2", "SegmentMean", "SegmentMin",
    "SegmentMinV2", "SegmentProd", "SegmentProdV2", "SegmentSum", "SegmentSumV2", "SelfAdjointEig",
    "SelfAdjointEigV2", "Sign", "Sin", "Sinh", "Spence", "Sqrt", "SqrtGrad", "Square", "SquaredDifference",
    "Sub", "Sum", "Svd", "Tan", "TridiagonalMatMul", "TridiagonalSolve", "TruncateDiv", "TruncateMod",
    "UnsortedSegmentMax", "UnsortedSegmentMin", "UnsortedSegmentProd", "UnsortedSegmentSum", "Xdivy", "Xlog1py",
    "Xlogy", "Zeta",
})

# Convolutions, pooling, activations, normalizations, softmax and losses, RNN cells (cuDNN kernels included: Keras 2
# LSTM/GRU exports carry a cuDNN variant of each layer), CTC decoders, top-k (with the TPU-oriented helpers
# KthOrderStatistic, MakeUnique, TopKUnique, TopKWithUnique, which have CPU kernels), and their gradients.
NN = frozenset({
    "ApproxTopK", "AvgPool", "AvgPool3D", "AvgPool3DGrad", "AvgPoolGrad", "BatchNormWithGlobalNormalization",
    "BatchNormWithGlobalNormalizationGrad", "BiasAdd", "BiasAddGrad", "BiasAddV1", "BlockLSTM", "BlockLSTMGrad",
    "BlockLSTMGradV2", "BlockLSTMV2", "CTCBeamSearchDecoder", "CTCGreedyDecoder", "CTCLoss", "CTCLossV2", "Conv",
    "Conv2D", "Conv2DBackpropFilter", "Conv2DBackpropFilterV2", "Conv2DBackpropInput", "Conv2DBackpropInputV2",
    "Conv3D", "Conv3DBackpropFilter", "Conv3DBackpropFilterV2", "Conv3DBackpropInput", "Conv3DBackpropInputV2",
    "CudnnRNN", "CudnnRNNBackprop", "CudnnRNNBackpropV2", "CudnnRNNBackpropV3", "CudnnRNNCanonicalToParams",
    "CudnnRNNCanonicalToParamsV2", "CudnnRNNParamsSize", "CudnnRNNParamsToCanonical", "CudnnRNNParamsToCanonicalV2",
    "CudnnRNNV2", "CudnnRNNV3", "DataFormatDimMap", "DataFormatVecPermute", "DepthwiseConv2dNative",
    "DepthwiseConv2dNativeBackpropFilter", "DepthwiseConv2dNativeBackpropInput", "Dilation2D",
    "Dilation2DBackpropFilter", "Dilation2DBackpropInput", "Elu", "EluGrad", "FractionalAvgPool",
    "FractionalAvgPoolGrad", "FractionalMaxPool", "FractionalMaxPoolGrad", "FusedBatchNorm", "FusedBatchNormGrad",
    "FusedBatchNormGradV2", "FusedBatchNormGradV3", "FusedBatchNormV2", "FusedBatchNormV3", "FusedPadConv2D",
    "FusedResizeAndPadConv2D", "GRUBlockCell", "GRUBlockCellGrad", "InTopK", "InTopKV2", "KthOrderStatistic",
    "L2Loss", "LRN", "LRNGrad", "LSTMBlockCell", "LSTMBlockCellGrad", "LeakyRelu", "LeakyReluGrad", "LogSoftmax",
    "MakeUnique", "MaxPool", "MaxPool3D", "MaxPool3DGrad", "MaxPool3DGradGrad", "MaxPoolGrad", "MaxPoolGradGrad",
    "MaxPoolGradGradV2", "MaxPoolGradGradWithArgmax", "MaxPoolGradV2", "MaxPoolGradWithArgmax", "MaxPoolV2",
    "MaxPoolWithArgmax", "NthElement", "Relu", "Relu6", "Relu6Grad", "ReluGrad", "Selu", "SeluGrad", "Sigmoid",
    "SigmoidGrad", "Softmax", "SoftmaxCrossEntropyWithLogits", "Softplus", "SoftplusGrad", "Softsign",
    "SoftsignGrad", "Tanh", "TanhGrad", "TopK", "TopKUnique", "TopKV2", "TopKWithUnique",
})

# Shapes, reshapes, slicing, gather and scatter into new tensors (not into variables), concat/split/stack, padding,
# tiling, reversing, where/unique/one-hot, casts and bitcasts, bucketize/bincount, and identities that stop
# gradients or check values.
ARRAY = frozenset({
    "BatchMatrixBandPart", "BatchMatrixDiag", "BatchMatrixDiagPart", "BatchMatrixSetDiag", "BatchToSpace",
    "BatchToSpaceND", "Bincount", "Bitcast", "BroadcastArgs", "BroadcastGradientArgs", "BroadcastTo",
    "Bucketize", "Cast", "CheckNumerics", "CheckNumericsV2", "Concat", "ConcatOffset", "ConcatV2",
    "ConjugateTranspose", "DeepCopy", "DenseBincount", "DenseCountSparseOutput", "DepthToSpace", "Diag",
    "DiagPart", "DynamicPartition", "DynamicStitch", "EnsureShape", "ExpandDims", "Fill", "Gather", "GatherNd",
    "GatherV2", "GuaranteeConst", "HistogramFixedWidth", "InplaceAdd", "InplaceSub", "InplaceUpdate",
    "InvertPermutation", "LinSpace", "ListDiff", "LowerBound", "MatrixBandPart", "MatrixDiag", "MatrixDiagPart",
    "MatrixDiagPartV2", "MatrixDiagPartV3", "MatrixDiagV2", "MatrixDiagV3", "MatrixSetDiag", "MatrixSetDiagV2",
    "MatrixSetDiagV3", "MirrorPad", "MirrorPadGrad", "OneHot", "OnesLike", "Pack", "Pad", "PadV2",
    "ParallelConcat", "ParallelDynamicStitch", "PreventGradient", "Range", "Rank", "Reshape", "Reverse",
    "ReverseSequence", "ReverseV2", "Roll", "ScatterNd", "ScatterNdNonAliasingAdd", "Select", "SelectV2",
    "Shape", "ShapeN", "Size", "Slice", "Snapshot", "SpaceToBatch", "SpaceToBatchND", "SpaceToDepth", "Split",
    "SplitV", "Squeeze", "StopGradient", "StridedSlice", "StridedSliceGrad", "TensorScatterAdd",
    "TensorScatterMax", "TensorScatterMin", "TensorScatterSub", "TensorScatterUpdate",
    "TensorStridedSliceUpdate", "Tile", "TileGrad", "ToBool", "Transpose", "Unique", "UniqueV2",
    "UniqueWithCounts", "UniqueWithCountsV2", "Unpack", "UnravelIndex", "UpperBound", "Where", "ZerosLike",
})

# SparseTensor and CSR sparse-matrix ops, set operations, (de)serialization of SparseTensors to strings, and the
# in-memory SparseTensorsMap of TF1 (AddSparseToTensorsMap & co.: a container of the session, like a hash table).
SPARSE = frozenset({
    "AddManySparseToTensorsMap", "AddSparseToTensorsMap", "CSRSparseMatrixComponents", "CSRSparseMatrixToDense",
    "CSRSparseMatrixToSparseTensor", "DenseToCSRSparseMatrix", "DenseToDenseSetOperation",
    "DenseToSparseSetOperation", "DeserializeManySparse", "DeserializeSparse", "SerializeManySparse",
    "SerializeSparse", "SetSize", "SparseAdd", "SparseAddGrad", "SparseBincount", "SparseConcat",
    "SparseCountSparseOutput", "SparseCross", "SparseCrossHashed", "SparseCrossV2", "SparseDenseCwiseAdd",
    "SparseDenseCwiseDiv", "SparseDenseCwiseMul", "SparseFillEmptyRows", "SparseFillEmptyRowsGrad", "SparseMatMul",
    "SparseMatrixAdd", "SparseMatrixMatMul", "SparseMatrixMul", "SparseMatrixNNZ", "SparseMatrixOrderingAMD",
    "SparseMatrixSoftmax", "SparseMatrixSoftmaxGrad", "SparseMatrixSparseCholesky", "SparseMatrixSparseMatMul",
    "SparseMatrixTranspose", "SparseMatrixZeros", "SparseReduceMax", "SparseReduceMaxSparse", "SparseReduceSum",
    "SparseReduceSumSparse", "SparseReorder", "SparseReshape", "SparseSegmentMean", "SparseSegmentMeanGrad",
    "SparseSegmentMeanGradV2", "SparseSegmentMeanWithNumSegments", "SparseSegmentSqrtN", "SparseSegmentSqrtNGrad",
    "SparseSegmentSqrtNGradV2", "SparseSegmentSqrtNWithNumSegments", "SparseSegmentSum", "SparseSegmentSumGrad",
    "SparseSegmentSumGradV2", "SparseSegmentSumWithNumSegments", "SparseSlice", "SparseSliceGrad", "SparseSoftmax",
    "SparseSoftmaxCrossEntropyWithLogits", "SparseSparseMaximum", "SparseSparseMinimum", "SparseSplit",
    "SparseTensorDenseAdd", "SparseTensorDenseMatMul", "SparseTensorToCSRSparseMatrix", "SparseToDense",
    "SparseToSparseSetOperation", "TakeManySparseFromTensorsMap",
})

# RaggedTensor ops.
RAGGED = frozenset({
    "RaggedBincount", "RaggedCountSparseOutput", "RaggedCross", "RaggedFillEmptyRows",
    "RaggedFillEmptyRowsGrad", "RaggedGather", "RaggedRange", "RaggedTensorFromVariant", "RaggedTensorToSparse",
    "RaggedTensorToTensor", "RaggedTensorToVariant", "RaggedTensorToVariantGradient",
})

# Resizing, cropping, color conversion, bounding boxes, patches; decoding and encoding images and WAV audio held in
# tensors (bytes in memory, never a path); spectrograms and MFCCs.
IMAGE = frozenset({
    "AdjustContrast", "AdjustContrastv2", "AdjustHue", "AdjustSaturation", "AudioMicrofrontend",
    "AudioSpectrogram", "CropAndResize", "CropAndResizeGradBoxes", "CropAndResizeGradImage",
    "DecodeAndCropJpeg", "DecodeBmp", "DecodeGif", "DecodeImage", "DecodeJpeg", "DecodeJxl", "DecodePng",
    "DecodeWav", "DecodeWebP", "DrawBoundingBoxes", "DrawBoundingBoxesV2", "EncodeJpeg",
    "EncodeJpegVariableQuality", "EncodePng", "EncodeWav", "ExtractGlimpse", "ExtractGlimpseV2",
    "ExtractImagePatches", "ExtractJpegShape", "ExtractVolumePatches", "HSVToRGB", "ImageProjectiveTransformV2",
    "ImageProjectiveTransformV3", "Mfcc", "RGBToHSV", "ResizeArea", "ResizeBicubic", "ResizeBicubicGrad",
    "ResizeBilinear", "ResizeBilinearGrad", "ResizeNearestNeighbor", "ResizeNearestNeighborGrad",
    "SampleDistortedBoundingBox", "SampleDistortedBoundingBoxV2", "ScaleAndTranslate", "ScaleAndTranslateGrad",
    "StatelessSampleDistortedBoundingBox",
})

# Non-max suppression (every version) and box proposals of detectors.
NMS = frozenset({
    "CombinedNonMaxSuppression", "GenerateBoundingBoxProposals", "NonMaxSuppression", "NonMaxSuppressionV2",
    "NonMaxSuppressionV3", "NonMaxSuppressionV4", "NonMaxSuppressionV5", "NonMaxSuppressionWithOverlaps",
})

# Stateless, op-seeded and tf.random.Generator ops (whose state is a variable), shuffles, and candidate samplers that
# need no vocabulary file (FixedUnigramCandidateSampler reads one: off).
RANDOM = frozenset({
    "AllCandidateSampler", "ComputeAccidentalHits", "LearnedUnigramCandidateSampler",
    "LogUniformCandidateSampler", "Multinomial", "NonDeterministicInts", "ParameterizedTruncatedNormal",
    "RandomCrop", "RandomGamma", "RandomGammaGrad", "RandomIndexShuffle", "RandomPoisson", "RandomPoissonV2",
    "RandomShuffle", "RandomStandardNormal", "RandomUniform", "RandomUniformInt", "RngReadAndSkip", "RngSkip",
    "SobolSample", "StatefulRandomBinomial", "StatefulStandardNormal", "StatefulStandardNormalV2",
    "StatefulTruncatedNormal", "StatefulUniform", "StatefulUniformFullInt", "StatefulUniformInt",
    "StatelessMultinomial", "StatelessParameterizedTruncatedNormal", "StatelessRandomBinomial",
    "StatelessRandomGammaV2", "StatelessRandomGammaV3", "StatelessRandomGetAlg", "StatelessRandomGetKeyCounter",
    "StatelessRandomGetKeyCounterAlg", "StatelessRandomNormal", "StatelessRandomNormalV2",
    "StatelessRandomPoisson", "StatelessRandomUniform", "StatelessRandomUniformFullInt",
    "StatelessRandomUniformFullIntV2", "StatelessRandomUniformInt", "StatelessRandomUniformIntV2",
    "StatelessRandomUniformV2", "StatelessShuffle", "StatelessTruncatedNormal", "StatelessTruncatedNormalV2",
    "StochasticCastToInt", "ThreadUnsafeUnigramCandidateSampler", "TruncatedNormal", "UniformCandidateSampler",
})

# Formatting, joining and splitting, regular expressions (RE2), unicode, hashing and fingerprints, base64, parsing of
# tf.Example/CSV/JSON/TensorProto held in strings, and the checkpoint machinery's file-name formatting
# (ShardedFilename, ShardedFilespec build a string; they open nothing).
STRINGS = frozenset({
    "AsString", "DecodeBase64", "DecodeCSV", "DecodeCompressed", "DecodeJSONExample", "DecodePaddedRaw",
    "DecodeRaw", "EncodeBase64", "Fingerprint", "ParseExample", "ParseExampleV2", "ParseSequenceExample",
    "ParseSequenceExampleV2", "ParseSingleExample", "ParseSingleSequenceExample", "ParseTensor", "ReduceJoin",
    "RegexFullMatch", "RegexReplace", "SerializeTensor", "ShardedFilename", "ShardedFilespec",
    "StaticRegexFullMatch", "StaticRegexReplace", "StringFormat", "StringJoin", "StringLength", "StringLower",
    "StringNGrams", "StringSplit", "StringSplitV2", "StringStrip", "StringToHashBucket",
    "StringToHashBucketFast", "StringToHashBucketStrong", "StringToNumber", "StringUpper", "Substr",
    "UnicodeDecode", "UnicodeDecodeWithOffsets", "UnicodeEncode", "UnicodeScript", "UnicodeTranscode",
    "UnsortedSegmentJoin",
})

# Quantize/dequantize/requantize, quantized kernels, fake quantization.
QUANTIZATION = frozenset({
    "Dequantize", "FakeQuantWithMinMaxArgs", "FakeQuantWithMinMaxArgsGradient", "FakeQuantWithMinMaxVars",
    "FakeQuantWithMinMaxVarsGradient", "FakeQuantWithMinMaxVarsPerChannel",
    "FakeQuantWithMinMaxVarsPerChannelGradient", "QuantizeAndDequantize", "QuantizeAndDequantizeV2",
    "QuantizeAndDequantizeV3", "QuantizeAndDequantizeV4", "QuantizeAndDequantizeV4Grad",
    "QuantizeDownAndShrinkRange", "QuantizeV2", "QuantizedAdd", "QuantizedAvgPool",
    "QuantizedBatchNormWithGlobalNormalization", "QuantizedBiasAdd", "QuantizedConcat", "QuantizedConcatV2",
    "QuantizedConv2D", "QuantizedConv2DAndRelu", "QuantizedConv2DAndReluAndRequantize",
    "QuantizedConv2DAndRequantize", "QuantizedConv2DPerChannel", "QuantizedConv2DWithBias",
    "QuantizedConv2DWithBiasAndRelu", "QuantizedConv2DWithBiasAndReluAndRequantize",
    "QuantizedConv2DWithBiasAndRequantize", "QuantizedConv2DWithBiasSignedSumAndReluAndRequantize",
    "QuantizedConv2DWithBiasSumAndRelu", "QuantizedConv2DWithBiasSumAndReluAndRequantize",
    "QuantizedDepthwiseConv2D", "QuantizedDepthwiseConv2DWithBias", "QuantizedDepthwiseConv2DWithBiasAndRelu",
    "QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize", "QuantizedInstanceNorm", "QuantizedMatMul",
    "QuantizedMatMulWithBias", "QuantizedMatMulWithBiasAndDequantize", "QuantizedMatMulWithBiasAndRelu",
    "QuantizedMatMulWithBiasAndReluAndRequantize", "QuantizedMatMulWithBiasAndRequantize", "QuantizedMaxPool",
    "QuantizedMul", "QuantizedRelu", "QuantizedRelu6", "QuantizedReluX", "QuantizedReshape",
    "QuantizedResizeBilinear", "RequantizationRange", "RequantizationRangePerChannel", "Requantize",
    "RequantizePerChannel", "UniformDequantize", "UniformQuantize", "UniformQuantizedAdd",
    "UniformQuantizedClipByValue", "UniformQuantizedConvolution", "UniformQuantizedConvolutionHybrid",
    "UniformQuantizedDot", "UniformQuantizedDotHybrid", "UniformRequantize",
})

# Resource and TF1 reference variables as the loader and the checkpoint machinery use them: creation, reads,
# assignments and scatter updates, all in memory (AssignVariableXlaConcatND/ReadVariableXlaSplitND: a variable
# written from / read as the shards of a TPU-partitioned tensor, on the host).
VARIABLES = frozenset({
    "Assign", "AssignAdd", "AssignAddVariableOp", "AssignSub", "AssignSubVariableOp", "AssignVariableOp",
    "AssignVariableXlaConcatND", "CountUpTo", "DisableCopyOnRead", "IsVariableInitialized", "ReadVariableOp",
    "ReadVariableXlaSplitND", "RefIdentity", "ResourceCountUpTo", "ResourceGather", "ResourceGatherNd",
    "ResourceScatterAdd", "ResourceScatterDiv", "ResourceScatterMax", "ResourceScatterMin", "ResourceScatterMul",
    "ResourceScatterNdAdd", "ResourceScatterNdMax", "ResourceScatterNdMin", "ResourceScatterNdSub",
    "ResourceScatterNdUpdate", "ResourceScatterSub", "ResourceScatterUpdate", "ResourceStridedSliceAssign",
    "ScatterAdd", "ScatterDiv", "ScatterMax", "ScatterMin", "ScatterMul", "ScatterNdAdd", "ScatterNdMax",
    "ScatterNdMin", "ScatterNdSub", "ScatterNdUpdate", "ScatterSub", "ScatterUpdate", "StridedSliceAssign",
    "VarHandleOp", "VarIsInitializedOp", "Variable", "VariableShape", "VariableV2",
})

# Optimizer steps (Apply*/ResourceApply*/SparseApply*): in-memory updates of variables, found in the training
# MetaGraphDefs of TF1 exports.
TRAINING = frozenset({
    "ApplyAdaMax", "ApplyAdadelta", "ApplyAdagrad", "ApplyAdagradDA", "ApplyAdagradV2", "ApplyAdam",
    "ApplyAddSign", "ApplyCenteredRMSProp", "ApplyFtrl", "ApplyFtrlV2", "ApplyGradientDescent", "ApplyMomentum",
    "ApplyPowerSign", "ApplyProximalAdagrad", "ApplyProximalGradientDescent", "ApplyRMSProp",
    "ResourceApplyAdaMax", "ResourceApplyAdadelta", "ResourceApplyAdagrad", "ResourceApplyAdagradDA",
    "ResourceApplyAdagradV2", "ResourceApplyAdam", "ResourceApplyAdamWithAmsgrad", "ResourceApplyAddSign",
    "ResourceApplyCenteredRMSProp", "ResourceApplyFtrl", "ResourceApplyFtrlV2", "ResourceApplyGradientDescent",
    "ResourceApplyKerasMomentum", "ResourceApplyMomentum", "ResourceApplyPowerSign",
    "ResourceApplyProximalAdagrad", "ResourceApplyProximalGradientDescent", "ResourceApplyRMSProp",
    "ResourceSparseApplyAdadelta", "ResourceSparseApplyAdagrad", "ResourceSparseApplyAdagradDA",
    "ResourceSparseApplyAdagradV2", "ResourceSparseApplyCenteredRMSProp", "ResourceSparseApplyFtrl",
    "ResourceSparseApplyFtrlV2", "ResourceSparseApplyKerasMomentum", "ResourceSparseApplyMomentum",
    "ResourceSparseApplyProximalAdagrad", "ResourceSparseApplyProximalGradientDescent",
    "ResourceSparseApplyRMSProp", "SparseApplyAdadelta", "SparseApplyAdagrad", "SparseApplyAdagradDA",
    "SparseApplyAdagradV2", "SparseApplyCenteredRMSProp", "SparseApplyFtrl", "SparseApplyFtrlV2",
    "SparseApplyMomentum", "SparseApplyProximalAdagrad", "SparseApplyProximalGradientDescent",
    "SparseApplyRMSProp",
})

# Hash tables, their lookups, inserts, imports and exports: computation on tables in memory (HashTableV2,
# LookupTableFindV2, LookupTableImportV2, ...). Off: InitializeTableFromDataset (runs a tf.data pipeline) and
# InitializeTableFromTextFile(V2), which read the file a *tensor* names when the model is initialized. That is safe
# only when the tensor is provably one of the model's assets, and proving it means following the name from
# asset_file_def (TF1: a placeholder the loader feeds, stored into a variable, read and passed through calls) or from
# the object graph's bound asset (TF2) to every initializer, the way the scan follows the checkpoint prefix. graphslim
# does not do that (its IR does not run table initializers either), so they stay refused with a message saying why
# (REFUSED_DETAIL); a trusted model is accepted with --allow-ops InitializeTableFromTextFileV2.
TABLES = frozenset({
    "AnonymousHashTable", "AnonymousMutableDenseHashTable", "AnonymousMutableHashTable",
    "AnonymousMutableHashTableOfTensors", "HashTable", "HashTableV2", "InitializeTable", "InitializeTableV2",
    "LookupTableExport", "LookupTableExportV2", "LookupTableFind", "LookupTableFindV2", "LookupTableImport",
    "LookupTableImportV2", "LookupTableInsert", "LookupTableInsertV2", "LookupTableRemoveV2", "LookupTableSize",
    "LookupTableSizeV2", "MutableDenseHashTable", "MutableDenseHashTableV2", "MutableHashTable",
    "MutableHashTableOfTensors", "MutableHashTableOfTensorsV2", "MutableHashTableV2",
})

# XLA's operations as TensorFlow ops (tf2xla; jax2tf without native serialization and TPU-trained exports carry
# them): each wraps one HLO instruction and computes only, on tensors (the reducers, comparators and branches of
# XlaReduce/XlaReduceWindow/XlaScatter/XlaSelectAndScatter/XlaVariadicSort/XlaIf/XlaWhile are library functions,
# scanned like the graph); sharding and dynamic-shape annotations (XlaSharding, XlaSpmd*, XlaSetBound, ...) are
# identities. They have kernels only under XLA (a graph with them runs with jit_compile, e.g. ``bench --xla``).
# Off: XlaCallModule (a serialized StableHLO module: custom calls and host callbacks into Python), XlaCustomCall(V2)
# (native code by target name), XlaHostCompute, XlaSendToHost/XlaRecvFromHost, XlaSend/XlaRecv and the _XlaRecvAtHost/
# _XlaSendFromHost/_XlaHostComputeMlir family (host and device transfers), XlaAllReduce and XlaReduceScatter
# (collectives across replicas), XlaLaunch(V2), _XlaCompile, _XlaRun, _XlaMerge, XlaClusterOutput,
# _XlaAotOnlyVarHandleOp, _XlaCompileMlirPlaceholderProgramKey (made by XLA's own compilation passes at run time,
# never exported), and the TPU embedding and SparseCore ops (XlaRecvTPUEmbedding*, XlaSendTPUEmbedding*,
# XlaSparseCore*, XlaSparseDenseMatmul*, XlaSparseActivationsUnstack, XlaSparseGradientsStack: TPU devices).
XLA = frozenset({
    "XlaBroadcastHelper", "XlaConcatND", "XlaConv", "XlaConvV2", "XlaDequantize", "XlaDot", "XlaDotV2",
    "XlaDynamicSlice", "XlaDynamicUpdateSlice", "XlaEinsum", "XlaGather", "XlaIf", "XlaKeyValueSort",
    "XlaOptimizationBarrier", "XlaPad", "XlaReduce", "XlaReducePrecision", "XlaReduceWindow",
    "XlaRemoveDynamicDimensionSize", "XlaReplicaId", "XlaRngBitGenerator", "XlaScatter", "XlaSelectAndScatter",
    "XlaSelfAdjointEig", "XlaSetBound", "XlaSetDynamicDimensionSize", "XlaSharding", "XlaSort", "XlaSplitND",
    "XlaSpmdFullToShardShape", "XlaSpmdShardToFullShape", "XlaSvd", "XlaVariadicReduce", "XlaVariadicReduceV2",
    "XlaVariadicSort", "XlaWhile",
})

# Leading-underscore ops are TensorFlow-internal; only these are allowed. Grappler's remapper writes them into a
# GraphDef (tensorflow.python.grappler.tf_optimizer.OptimizeGraph on a placed graph turns Conv2D+BiasAdd+Relu into
# _FusedConv2D, with oneDNN on or off), so frozen graphs exported after grappler carry them; they compute only. So do
# _TensorToHashBucketFast (the remapper's AsString + StringToHashBucketFast) and _UnaryOpsComposition (the arithmetic
# optimizer's chain of element-wise unary ops, named in its op_names attr and checked against a fixed table).
# The _Mkl*/_MklNative* ops are created later, by the oneDNN layout pass while a session partitions its graph, are
# never exported, and some expect oneDNN layout tensors beside their inputs: off, like _Arg/_Retval/_Send/_Recv,
# _ReadVariablesOp/_VarHandlesOp and the other runtime-only rewrites. The oneDNN quantized fusions
# (_FusedQuantizedConv2D, _FusedQuantizedDepthwiseConv2D, _QuantizedMatMul, _QuantizedMaxPool3D) compute only but have
# kernels only in oneDNN builds and come from quantization tools rather than TensorFlow's export: off until a model
# that carries them is reviewed. Also off: _ParallelConcatStart (uninitialized memory, like Empty), _SwitchN, _If,
# _While, _ScopedAllocator*, _HostCast, _EagerConst, _ArrayToList/_ListToArray (runtime lowering, never exported).
INTERNAL = frozenset({
    "_FusedBatchNormEx", "_FusedConv2D", "_FusedConv3D", "_FusedDepthwiseConv2dNative", "_FusedMatMul",
    "_TensorToHashBucketFast", "_UnaryOpsComposition",
})

# Allowed only with these attr values (see condition()); each text completes "is allowed ...".
CONDITIONAL = {
    "PrintV2": "only when it prints to stderr, stdout or the log (output_stream)",
    "Copy": "only without debug_ops_spec (debug specs send tensors to files and URLs)",
    "CopyHost": "only without debug_ops_spec (debug specs send tensors to files and URLs)",
    "DecodeProtoV2": "only with descriptor_source local:// (TensorFlow's own descriptors, not a file)",
    "EncodeProto": "only with descriptor_source local:// (TensorFlow's own descriptors, not a file)",
}

# Reading and writing checkpoint files: accepted only as the model's checkpoint machinery (the saver that
# saver_def names, the object graph's saveable functions), which graphslim.io.scan recognises.
CHECKPOINT_OPS = frozenset({"Save", "SaveV2", "SaveSlices", "Restore", "RestoreV2", "RestoreSlice",
                            "MergeV2Checkpoints"})

# Why some ops off the list are refused, beyond "not on the allow-list" (the detail of the scan's finding).
REFUSED_DETAIL = {
    op: (" (it fills a lookup table from the file a tensor names, read when the model is initialized; graphslim does "
         "not check that the name is one of the model's assets, so the file could be any file the process can read)")
    for op in ("InitializeTableFromTextFile", "InitializeTableFromTextFileV2")
}

# (key, title, ops) in the order --list-allowed prints them.
CATEGORIES = (
    ("inputs", "graph inputs and constants", INPUTS),
    ("control_flow", "control flow, calls, identities, assertions", CONTROL_FLOW),
    ("tensor_lists", "tensor lists, maps and arrays", TENSOR_LISTS),
    ("math", "math", MATH),
    ("nn", "neural-network layers", NN),
    ("array", "array and shape manipulation", ARRAY),
    ("sparse", "sparse tensors and matrices", SPARSE),
    ("ragged", "ragged tensors", RAGGED),
    ("image", "image and audio", IMAGE),
    ("nms", "non-max suppression", NMS),
    ("random", "random numbers", RANDOM),
    ("strings", "strings that touch no file", STRINGS),
    ("quantization", "quantization", QUANTIZATION),
    ("variables", "variables", VARIABLES),
    ("training", "optimizer updates of variables", TRAINING),
    ("tables", "lookup tables filled from tensors", TABLES),
    ("xla", "XLA operations (compiled with XLA)", XLA),
    ("internal", "grappler fusions (internal ops)", INTERNAL),
)

ALLOWED = frozenset().union(*(ops for _, _, ops in CATEGORIES)) | frozenset(CONDITIONAL)

_PRINT_STREAMS = frozenset({"stderr", "stdout", "log(info)", "log(warning)", "log(error)"})


def condition(op: str, attrs) -> str | None:
    """For a :data:`CONDITIONAL` op with ``attrs`` (an AttrValue map): None when allowed, else the attr
    value that makes it refused (e.g. ``" (output_stream 'file:///tmp/x')"``)."""
    if op == "PrintV2":
        stream = _attr_s(attrs, "output_stream") or "stderr"
        if stream not in _PRINT_STREAMS:
            return f" (output_stream {stream!r})"
    elif op in ("Copy", "CopyHost"):
        specs = _attr_list_s(attrs, "debug_ops_spec")
        if specs:
            return f" (debug_ops_spec {specs[0]!r})"
    elif op in ("DecodeProtoV2", "EncodeProto"):
        source = _attr_s(attrs, "descriptor_source")
        if source and source != "local://":
            return f" (descriptor_source {source!r})"
    return None


def describe() -> dict:
    """The list as data (what ``graphslim scan --list-allowed --json`` prints)::

        {"categories": [{"key", "title", "ops": [...]}], "conditional": {op: condition},
         "checkpoint_machinery": [...], "count": N}
    """
    return {"categories": [{"key": key, "title": title, "ops": sorted(ops)} for key, title, ops in CATEGORIES],
            "conditional": dict(sorted(CONDITIONAL.items())),
            "checkpoint_machinery": sorted(CHECKPOINT_OPS),
            "count": len(ALLOWED)}


def _attr_s(attrs, key: str) -> str:
    try:
        if key in attrs:
            return attrs[key].s.decode("utf-8", "replace")
    except (AttributeError, TypeError, ValueError):
        pass
    return ""


def _attr_list_s(attrs, key: str) -> list[str]:
    try:
        if key in attrs:
            return [s.decode("utf-8", "replace") for s in attrs[key].list.s]
    except (AttributeError, TypeError, ValueError):
        pass
    return []
