//! ResNet's BasicBlock: conv3×3 → BN → ReLU → conv3×3 → BN, plus the (optionally 1×1-conv + BN) shortcut,
//! then ReLU after the add.

use super::net::{
    bn_params, bn_state, conv_params, conv_state, in_layer, ConvExec, ParamVisitor, StateVisitor,
};
use crate::error::Result;
use crate::layers::activation::{add_inplace, add_relu_inplace};
use crate::layers::{BatchNorm2d, Conv2d, Conv2dConfig, Relu};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// torchvision's BasicBlock with its activations and gradient buffers.
pub struct BasicBlock {
    pub conv1: Conv2d,
    pub bn1: BatchNorm2d,
    pub conv2: Conv2d,
    pub bn2: BatchNorm2d,
    /// `downsample.0` (1×1 conv with stride) and `downsample.1` (BN), when the shape changes.
    pub downsample: Option<(Conv2d, BatchNorm2d)>,
    relu: Relu,
    // forward activations
    t1: Tensor,
    t3: Tensor,
    t4: Tensor,
    s1: Tensor,
    s2: Tensor,
    /// The last forward's executor applied bn1 or bn2 with its conv ([`ConvExec::conv_forward_mapped`]): that
    /// conv's own output was not kept, so no backward can follow.
    mapped: bool,
    // backward scratch
    g1: Tensor,
    g2: Tensor,
    g3: Tensor,
    g4: Tensor,
}

impl BasicBlock {
    pub fn new(in_ch: usize, out_ch: usize, stride: usize, rng: &mut Rng) -> Self {
        let downsample = (stride != 1 || in_ch != out_ch).then(|| {
            (
                Conv2d::new(
                    in_ch,
                    out_ch,
                    1,
                    Conv2dConfig {
                        stride,
                        padding: 0,
                        bias: false,
                    },
                    rng,
                ),
                BatchNorm2d::new(out_ch),
            )
        });
        BasicBlock {
            conv1: Conv2d::new(
                in_ch,
                out_ch,
                3,
                Conv2dConfig {
                    stride,
                    padding: 1,
                    bias: false,
                },
                rng,
            ),
            bn1: BatchNorm2d::new(out_ch).with_relu(true),
            conv2: Conv2d::new(
                out_ch,
                out_ch,
                3,
                Conv2dConfig {
                    stride: 1,
                    padding: 1,
                    bias: false,
                },
                rng,
            ),
            bn2: BatchNorm2d::new(out_ch),
            downsample,
            relu: Relu,
            t1: Tensor::default(),
            t3: Tensor::default(),
            t4: Tensor::default(),
            s1: Tensor::default(),
            s2: Tensor::default(),
            mapped: false,
            g1: Tensor::default(),
            g2: Tensor::default(),
            g3: Tensor::default(),
            g4: Tensor::default(),
        }
    }

    /// Convs in execution order: conv1, downsample.0 (it reads the same input as conv1), conv2.
    pub fn visit_convs(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Conv2d)) {
        f(&format!("{prefix}.conv1"), &mut self.conv1);
        if let Some((c, _)) = self.downsample.as_mut() {
            f(&format!("{prefix}.downsample.0"), c);
        }
        f(&format!("{prefix}.conv2"), &mut self.conv2);
    }

    /// The block's convs in execution order (as [`BasicBlock::visit_convs`]).
    pub fn convs_mut(&mut self) -> Vec<&mut Conv2d> {
        let mut out = vec![&mut self.conv1];
        if let Some((c, _)) = self.downsample.as_mut() {
            out.push(c);
        }
        out.push(&mut self.conv2);
        out
    }

    pub fn visit_params(&mut self, prefix: &str, f: &mut ParamVisitor) {
        conv_params(&format!("{prefix}.conv1"), &mut self.conv1, f);
        bn_params(&format!("{prefix}.bn1"), &mut self.bn1, f);
        conv_params(&format!("{prefix}.conv2"), &mut self.conv2, f);
        bn_params(&format!("{prefix}.bn2"), &mut self.bn2, f);
        if let Some((c, b)) = self.downsample.as_mut() {
            conv_params(&format!("{prefix}.downsample.0"), c, f);
            bn_params(&format!("{prefix}.downsample.1"), b, f);
        }
    }

    /// The block's state-dict entries in torchvision's order, stopping at the first error of `f`.
    pub fn try_visit_state<E>(
        &mut self,
        prefix: &str,
        f: &mut StateVisitor<'_, E>,
    ) -> std::result::Result<(), E> {
        conv_state(&format!("{prefix}.conv1"), &mut self.conv1, f)?;
        bn_state(&format!("{prefix}.bn1"), &mut self.bn1, f)?;
        conv_state(&format!("{prefix}.conv2"), &mut self.conv2, f)?;
        bn_state(&format!("{prefix}.bn2"), &mut self.bn2, f)?;
        if let Some((c, b)) = self.downsample.as_mut() {
            conv_state(&format!("{prefix}.downsample.0"), c, f)?;
            bn_state(&format!("{prefix}.downsample.1"), b, f)?;
        }
        Ok(())
    }

    /// x: [B, C, H, W] → out: [B, M, H/s, W/s]; out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).
    pub fn forward(
        &mut self,
        x: &Tensor,
        out: &mut Tensor,
        train: bool,
        exec: &mut dyn ConvExec,
    ) -> Result<()> {
        // In inference the executor may apply bn1 (and bn2) as it writes conv1's (conv2's) output
        // (`ConvExec::conv_forward_mapped`); their outputs then go where the BatchNorms would have put them.
        let mapped1 = if train {
            exec.conv_forward(&mut self.conv1, x, &mut self.t1, train)
                .map(|()| false)
        } else {
            exec.conv_forward_mapped(&mut self.conv1, x, &mut self.t1, self.bn1.inference_map())
        }
        .map_err(|e| in_layer("conv1", e))?;
        if let Some((c, b)) = self.downsample.as_mut() {
            // The shortcut reads the block input, as conv1 just did: the split runtime reuses its decomposition.
            exec.conv_forward_same_input(c, x, &mut self.s1, train, self.conv1.id)
                .map_err(|e| in_layer("downsample.0", e))?;
            b.forward(&self.s1, &mut self.s2, train)?;
        }
        // bn1 has ReLU fused
        if mapped1 {
            std::mem::swap(&mut self.t1, &mut self.t3);
        } else {
            self.bn1.forward(&self.t1, &mut self.t3, train)?;
        }
        let mapped2 = if train {
            exec.conv_forward(&mut self.conv2, &self.t3, &mut self.t4, train)
                .map(|()| false)
        } else {
            exec.conv_forward_mapped(
                &mut self.conv2,
                &self.t3,
                &mut self.t4,
                self.bn2.inference_map(),
            )
        }
        .map_err(|e| in_layer("conv2", e))?;
        if mapped2 {
            std::mem::swap(&mut self.t4, out);
        } else {
            self.bn2.forward(&self.t4, out, train)?;
        }
        self.mapped = mapped1 || mapped2;
        let shortcut = if self.downsample.is_some() {
            &self.s2
        } else {
            x
        };
        if shortcut.shape != out.shape {
            return Err(crate::CoreError::Shape(format!(
                "residual add: {:?} vs {:?}",
                shortcut.shape, out.shape
            )));
        }
        add_relu_inplace(out, shortcut);
        Ok(())
    }

    /// x: forward input, out: forward output, dy: ∇out → dx: ∇x; accumulates every parameter gradient.
    pub fn backward(
        &mut self,
        x: &Tensor,
        out: &Tensor,
        dy: &Tensor,
        dx: &mut Tensor,
        exec: &mut dyn ConvExec,
    ) -> Result<()> {
        if self.mapped {
            return Err(crate::CoreError::Invalid(
                "block backward: the last forward was an inference forward whose BatchNorms were applied with \
                 their convs; run a training forward first"
                    .into(),
            ));
        }
        // g1 = ∇(sum before the final ReLU)
        self.relu.backward(out, dy, &mut self.g1);
        self.bn2.backward(&self.t4, &self.g1, &mut self.g2)?;
        exec.conv_backward(&mut self.conv2, &self.t3, &self.g2, Some(&mut self.g3))
            .map_err(|e| in_layer("conv2", e))?;
        self.bn1.backward(&self.t1, &self.g3, &mut self.g2)?;
        exec.conv_backward(&mut self.conv1, x, &self.g2, Some(dx))
            .map_err(|e| in_layer("conv1", e))?;
        match self.downsample.as_mut() {
            Some((c, b)) => {
                b.backward(&self.s1, &self.g1, &mut self.g3)?;
                exec.conv_backward(c, x, &self.g3, Some(&mut self.g4))
                    .map_err(|e| in_layer("downsample.0", e))?;
                add_inplace(dx, &self.g4);
            }
            None => add_inplace(dx, &self.g1),
        }
        Ok(())
    }

    /// (conv multiply–adds, output shape) for an input shape.
    pub fn macs(&self, x: &[usize]) -> (u64, Vec<usize>) {
        let mut m = self.conv1.macs(x);
        let s1 = self
            .conv1
            .out_shape(x)
            .map(|s| s.to_vec())
            .unwrap_or_default();
        m += self.conv2.macs(&s1);
        if let Some((c, _)) = &self.downsample {
            m += c.macs(x);
        }
        (m, s1)
    }
}
