"""The frozen base in less memory. --fp8_base stores its layers in float8 (diffusers' layerwise casting, kohya's
flag); --nf4_base stores the UNet's linear layers in 4-bit NormalFloat (bitsandbytes, set up as diffusers'
BitsAndBytesConfig sets it up: QLoRA's recipe). Each layer computes in the run's dtype, and the LoRA on top stays
fp32. Both are applied to an empty (meta-device) model before its weights stream in, so no bf16 copy of the
model is ever whole."""

import ctypes
import functools
import sys

import torch
import torch.utils.checkpoint

from .messages import UserError, one_line

FP8 = torch.float8_e4m3fn
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what a frozen weight computes in; not how it is held
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
NF4_BLOCKSIZE = 64  # bitsandbytes' default: one absmax per 64 weights (double quantisation stores those in 8 bits)


def base_storage(args):
    """"fp8", "nf4" or None (the run's dtype)."""
    return "fp8" if args.fp8_base else "nf4" if args.nf4_base else None


def storage_note(storage, compute_dtype):
    """How a quantised base is held, for the lines that say what renders class images and validation; "" for none."""
    held = {"fp8": "float8_e4m3fn", "nf4": "4-bit NF4 (its linear layers)"}.get(storage)
    return f"; base UNet held in {held}, computed in {str(compute_dtype).removeprefix('torch.')}" if held else ""


def check_base_storage(storage, device):
    """Before any model loads: what this machine's libraries cannot do, in one line. bitsandbytes' 4-bit kernels
    exist for CUDA, and in pure torch for a CPU from 0.46 on; a tiny tensor quantised here shows which holds."""
    if storage != "nf4":
        return
    try:
        import bitsandbytes.functional as bnb_functional

        bnb_functional.quantize_4bit(torch.ones(NF4_BLOCKSIZE, device=device), quant_type="nf4")
    except Exception as e:  # ImportError, no kernel for this device, a CUDA set-up error
        raise UserError(f"--nf4_base: bitsandbytes cannot quantise to 4 bits on this {device.type} "
                        f"({one_line(e)[:160]}); pass --fp8_base instead, or drop --nf4_base") from None


def prepare_storage(model, storage, compute_dtype):
    """An empty model (meta device) given the storage each weight will load into: float8 for the layers diffusers'
    layerwise casting stores in it (cast_layers_to_fp8), bitsandbytes' Linear4bit for each linear layer of the UNet
    under nf4. stream_weights then casts each weight into its slot."""
    if storage == "nf4":
        from diffusers.quantizers.bitsandbytes import replace_with_bnb_linear

        narrow = [name for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and not nf4_quantizes(module)]
        replace_with_bnb_linear(model, modules_to_not_convert=narrow, quantization_config=nf4_config(compute_dtype))
        for module in model.modules():
            # bitsandbytes repacks a layer's weights in place for its CPU inference kernel at the first forward
            # without grad (validation), in a layout that needs other widths; training switches back and forth
            if type(module).__name__ == "Linear4bit":
                module.support_avx512bf16_for_cpu = False
                module.register_forward_pre_hook(input_in_autocast_dtype)
    torch.nn.Module.to(model, compute_dtype)  # the slots' dtype (diffusers' own .to warns on a meta model)
    if storage == "fp8":
        cast_layers_to_fp8(model, compute_dtype)
        save_weights_for_backward_in_fp8(model, compute_dtype)
    return model


def nf4_config(compute_dtype):
    """QLoRA's recipe, as diffusers' quantizer takes it: NF4 with double quantisation."""
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def nf4_quantizes(linear):
    """Whether --nf4_base holds this linear layer in 4 bits: bitsandbytes' CPU kernel takes an input width that is a
    whole number of blocks (all of SSD-1B's are); a narrower layer stays in the compute dtype."""
    return linear.in_features % NF4_BLOCKSIZE == 0


def cast_layers_to_fp8(model, compute_dtype):
    """diffusers' layerwise casting: the UNet with its own skip list ("norm"), a text encoder with diffusers' default
    one and its token and position embeddings, as kohya keeps them (the identifier's own token embedding would be
    rounded to 3 bits of mantissa). The memory estimate counts the float8 share by calling this on meta models."""
    from diffusers import ModelMixin
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    if isinstance(model, ModelMixin):
        model.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=compute_dtype)
    else:
        apply_layerwise_casting(model, storage_dtype=FP8, compute_dtype=compute_dtype,
                                skip_modules_pattern=(*DEFAULT_SKIP_MODULES_PATTERN, "embedding"))


def keep_freed_copies_off_the_heap():
    """For a run over a quantised base, from its first load. Each fp8 layer's upcast copy is allocated and freed at
    every call, and so are bitsandbytes' (de)quantising temporaries, and the streamed load's cast tensors. glibc's
    malloc serves blocks that large with mmap and gives them back at once, until the first is freed: it then raises
    its mmap threshold to that size, and from there on serves them from the heap, whose freed pages it keeps. On a
    CPU the run's peak then grew by over 1 GiB (full-size SSD-1B at 128 px: 3.23 GiB, against 2.09 with the
    threshold fixed; nf4's UNet load, 4.27 against 1.69: benchmarks/RESULTS.md). Setting the threshold turns that
    adjustment off. Where the C library is not glibc, or the process is not on Linux, nothing is done."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024)  # glibc's own default, made fixed
    except (OSError, AttributeError):  # musl and others have no mallopt
        pass


def input_in_autocast_dtype(module, args):
    """A 4-bit layer answers in its input's dtype, where autocast's linear layer answers in autocast's: an fp32
    time embedding would stay fp32 and meet a bf16 norm, which a CPU refuses ("mixed dtype"). So under autocast its
    input comes in autocast's dtype, as nn.Linear's would be cast."""
    device = args[0].device.type
    if torch.is_autocast_enabled(device):
        return (args[0].to(torch.get_autocast_dtype(device)), *args[1:])
    return None


def quantized_slot(model, name):
    """The bitsandbytes 4-bit parameter `name` will load into, or None for an ordinary one."""
    module_name, _, leaf = name.rpartition(".")
    try:
        parameter = model.get_submodule(module_name)._parameters.get(leaf)
    except AttributeError:  # a name the model has no place for: load_state_dict reports it
        return None
    return parameter if type(parameter).__name__ == "Params4bit" else None


def load_quantized(model, name, tensor, slot, device):
    """One weight quantised to 4 bits as it moves to `device`, as diffusers' bitsandbytes quantizer does it."""
    import bitsandbytes as bnb

    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = bnb.nn.Params4bit(tensor, requires_grad=False, **slot.__dict__).to(device)


def save_weights_for_backward_in_fp8(model, compute_dtype):
    """Layerwise casting casts a layer's float8 weights up for its forward and back after it, but autograd keeps
    the upcast copy for the backward pass (a linear layer's input gradient needs its weight): in training, every
    frozen layer's weights would then be held twice, in float8 and in `compute_dtype`, and fp8 would save nothing
    at the peak. Here, during each cast layer's forward, autograd keeps a reference to the layer instead, and the
    backward pass casts its float8 weight up again. The values are the same: float8 to bf16 or fp32 is exact."""
    def pack(module, tensor):
        if tensor.untyped_storage().data_ptr() == module.weight.untyped_storage().data_ptr():
            return module, tensor.size(), tensor.stride(), tensor.storage_offset()
        return tensor  # the layer's input, saved as it is

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        module, size, stride, offset = packed
        return module.weight.to(compute_dtype).as_strided(size, stride, offset)

    # Under gradient checkpointing, checkpoint's own hooks must see what its blocks save (it drops it and
    # recomputes), and a hook pushed inside would take their place: each forward asks whether it is on
    checkpointing, pushed = [False], []
    asks = next((name for name in ("is_activation_checkpointing", "is_gradient_checkpointing")  # transformers 5's
                 if hasattr(type(model), name)), None)

    def start(model, args):
        checkpointing[0] = bool(asks and getattr(model, asks))

    def enter(module, args, hooks):
        pushed.append(torch.is_grad_enabled() and not checkpointing[0])
        if pushed[-1]:
            hooks.__enter__()

    def leave(module, args, output, hooks):
        if pushed.pop():
            hooks.__exit__()

    model.register_forward_pre_hook(start)
    for module in model.modules():
        if getattr(module, "weight", None) is not None and module.weight.dtype == FP8:
            hooks = torch.autograd.graph.saved_tensors_hooks(functools.partial(pack, module), unpack)
            module.register_forward_pre_hook(functools.partial(enter, hooks=hooks))
            module.register_forward_hook(functools.partial(leave, hooks=hooks), always_call=True)


def enable_unet_checkpointing(unet, storage):
    """Gradient checkpointing of the UNet. Over a float8 base it is torch's reentrant checkpointing: the
    non-reentrant kind that diffusers uses compares what its recomputation saves with what the forward saved, and
    layerwise casting changes a weight's dtype between the two, which it refuses. Reentrant checkpointing gives
    grads only to blocks whose input needs them, so conv_in's output is made to (as transformers'
    enable_input_require_grads does for a text encoder), and every block's LoRA gets its gradient."""
    if storage != "fp8":
        return unet.enable_gradient_checkpointing()
    unet.enable_gradient_checkpointing(functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True))
    unet.conv_in.register_forward_hook(lambda module, args, output: output.requires_grad_(torch.is_grad_enabled()))


def finish_lora_over_fp8(modules, init):
    """LoRA over a float8 base, once injected. peft moves a new adapter to its base layer's dtype, so LoRA's initial
    weights were rounded to float8 (3 bits of mantissa) before cast_training_params made them fp32 again: they are
    drawn again here, in fp32, with peft's own initialiser. And the frozen weights are left out of the broadcast
    with which DistributedDataParallel starts (every process loaded the same ones), which gloo refuses for float8
    ("Invalid scalar type")."""
    from peft.tuners.lora import LoraLayer

    for module in modules:
        for layer in module.modules():
            if isinstance(layer, LoraLayer):
                for adapter in layer.lora_A:
                    layer.reset_lora_parameters(adapter, init)
        frozen = [name for name, parameter in module.named_parameters() if not parameter.requires_grad]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
