//! The `#[function]` attribute of [`cloudpipe-guest`](https://docs.rs/cloudpipe-guest).
//! Use it through that crate (`#[cloudpipe_guest::function]`): the expansion names
//! paths inside `cloudpipe_guest`, and its docs describe what the attribute does.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, Pat, ReturnType, Type, parse_macro_input};

/// Makes a plain Rust function callable as a typed Cloudpipe function: see
/// `cloudpipe_guest::function`.
#[proc_macro_attribute]
pub fn function(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        let attr = proc_macro2::TokenStream::from(attr);
        return syn::Error::new(attr.span(), "#[cloudpipe_guest::function] takes no arguments")
            .to_compile_error()
            .into();
    }
    let func = parse_macro_input!(item as ItemFn);
    match expand(&func) {
        Ok(ts) => ts.into(),
        Err(e) => {
            let err = e.to_compile_error();
            quote!(#func #err).into()
        }
    }
}

fn expand(func: &ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    let sig = &func.sig;
    if let Some(a) = &sig.asyncness {
        return Err(syn::Error::new(a.span(), "a Cloudpipe function cannot be async"));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(sig.generics.span(), "a Cloudpipe function cannot be generic"));
    }
    let ident = &sig.ident;
    let name = ident.to_string();
    let mut bindings = Vec::new();
    let mut param_names = Vec::new();
    let mut param_types = Vec::new();
    let mut call_args = Vec::new();
    for (i, input) in sig.inputs.iter().enumerate() {
        let FnArg::Typed(pt) = input else {
            return Err(syn::Error::new(input.span(), "a Cloudpipe function cannot take `self`"));
        };
        let pname = match &*pt.pat {
            Pat::Ident(p) => p.ident.to_string(),
            _ => format!("arg{i}"),
        };
        if let Type::Reference(r) = &*pt.ty {
            return Err(syn::Error::new(
                r.span(),
                "arguments arrive as owned JSON values: take `String` or `Vec<T>`, not a reference",
            ));
        }
        let ty = &pt.ty;
        let var = syn::Ident::new(&format!("__cloudpipe_arg{i}"), Span::mixed_site());
        bindings.push(quote_spanned! {ty.span()=>
            let #var: #ty = __args.take(#i)?;
        });
        let ty_text = quote!(#ty).to_string().replace(' ', "");
        param_names.push(pname);
        param_types.push(ty_text);
        call_args.push(var);
    }
    let output = match &sig.output {
        ReturnType::Type(_, ty) if returns_result(ty) => {
            quote!(::cloudpipe_guest::__private::result_output(#ident(#(#call_args),*)))
        }
        _ => quote!(::cloudpipe_guest::__private::output(#ident(#(#call_args),*))),
    };
    let arity = param_names.len();
    let params = param_names.iter().zip(&param_types).map(|(n, t)| quote!((#n, #t)));
    Ok(quote! {
        #func

        const _: () = {
            fn __cloudpipe_call(
                mut __args: ::cloudpipe_guest::__private::Args,
            ) -> ::core::result::Result<::cloudpipe_guest::__private::Value, ::cloudpipe_guest::Error> {
                #(#bindings)*
                #output
            }
            ::cloudpipe_guest::__private::inventory::submit! {
                ::cloudpipe_guest::__private::Registered {
                    name: #name,
                    params: &[#(#params),*],
                    arity: #arity,
                    call: __cloudpipe_call,
                }
            }
        };

        // Brings the dispatching `main` into this module; a `main` of the crate's
        // own shadows it, and repeating the glob for every function is allowed.
        #[allow(unused_imports)]
        use ::cloudpipe_guest::__entry::*;
    })
}

/// True when the return type is spelled `Result<..>` (any path ending in `Result`),
/// the way `#[test]` and `main` treat it: the error goes to stderr.
fn returns_result(ty: &Type) -> bool {
    match ty {
        Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == "Result"),
        _ => false,
    }
}
